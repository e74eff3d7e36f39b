"""lmgen: fast text generation with large language models.

Public API::

    from lmgen import LLM, SamplingParams                        # lmgen's own
    from lmgen import AutoModelForCausalLM, AutoTokenizer        # transformers' shape
"""

from lmgen.auto import AutoModelForCausalLM, AutoTokenizer, set_seed
from lmgen.engine.config import EngineConfig
from lmgen.engine.engine import Engine
from lmgen.generation_config import GenerationConfig
from lmgen.errors import InvalidArgumentError, LmgenError, ModelNotFoundError, UnsupportedModelError
from lmgen.llm import LLM
from lmgen.outputs import CompletionOutput, Logprob, RequestOutput
from lmgen.params import SamplingParams
from lmgen.streamers import AsyncTextIteratorStreamer, TextIteratorStreamer, TextStreamer

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "Engine", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob",
    "LmgenError", "InvalidArgumentError", "ModelNotFoundError", "UnsupportedModelError", "__version__",
    "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "set_seed",
    "TextStreamer", "TextIteratorStreamer", "AsyncTextIteratorStreamer",
]
