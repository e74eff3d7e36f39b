"""lmgen: fast text generation with large language models.

Public API::

    from lmgen import LLM, SamplingParams
"""

from lmgen.engine.config import EngineConfig
from lmgen.engine.engine import Engine
from lmgen.errors import InvalidArgumentError, LmgenError, ModelNotFoundError, UnsupportedModelError
from lmgen.llm import LLM
from lmgen.outputs import CompletionOutput, Logprob, RequestOutput
from lmgen.params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "Engine", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob",
    "LmgenError", "InvalidArgumentError", "ModelNotFoundError", "UnsupportedModelError", "__version__",
]
