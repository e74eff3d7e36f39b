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
from lmgen.layers.quant import QuantConfig
from lmgen.outputs import CompletionOutput, Logprob, RequestOutput
from lmgen.params import BeamSearchParams, SamplingParams
from lmgen.perplexity import perplexity
from lmgen.quantization_config import BitsAndBytesConfig
from lmgen.quantize import quantize_checkpoint
from lmgen.streamers import AsyncTextIteratorStreamer, TextIteratorStreamer, TextStreamer

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "BeamSearchParams", "Engine", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob",
    "LmgenError", "InvalidArgumentError", "ModelNotFoundError", "UnsupportedModelError", "__version__",
    "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "set_seed",
    "TextStreamer", "TextIteratorStreamer", "AsyncTextIteratorStreamer",
    "QuantConfig", "BitsAndBytesConfig", "quantize_checkpoint", "perplexity",
]
