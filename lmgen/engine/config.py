"""EngineConfig: how the engine loads the model and budgets its memory and batches."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmgen.engine.speculative import SpeculativeConfig
from lmgen.errors import InvalidArgumentError
from lmgen.layers.precision import compute_dtype
from lmgen.layers.quant import DEFAULT_GROUP_SIZE, QuantConfig

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

#: KV-cache budget on a CPU when the caller sets none (the cache never grows past what
#: max_num_seqs requests of max_model_len tokens can use).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
#: On a GPU: this fraction of the memory still free after loading the weights.
DEFAULT_GPU_KV_CACHE_FRACTION = 0.85

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: int | float | str) -> int:
    """Bytes from 1073741824, "1GiB", "512MB", "2g" (k/m/g/t: powers of 1000; ki/mi/gi/ti: 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise InvalidArgumentError(f"cannot read {value!r} as a size: write bytes or e.g. '512MiB', '2GiB'")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Validated on creation; every field maps to an argument of ``LLM(...)`` and a CLI flag."""

    model: str | None = None  # folder, .gguf file or hub id; None: the embedded demo model
    gguf_file: str | None = None  # a GGUF file of the folder or hub repo `model` (transformers' gguf_file)
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    kv_cache_memory: int | str | None = None  # bytes or "2GiB"; None: see DEFAULT_*
    kv_cache_dtype: str = "auto"  # keys and values stored in: auto (the model's dtype), float16, bfloat16, float32
    max_model_len: int | None = None  # context length; None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_num_partial_prefills: int = 1  # >1: prompts that share a step while several wait (lmgen/engine/scheduler.py)
    block_size: int = 16
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompts' shared beginnings
    max_logprobs: int = 20  # the most alternatives a request's logprobs or prompt_logprobs may ask for (vLLM's)
    quantization: str | None = None  # weight-only: "int8" (per output channel), "int4" (per group), or llama.cpp's
    # recipes of GGUF blocks "q4_k_m", "q6_k", "q8_0" (lmgen/layers/ggml_recipes.py)
    quantization_group_size: int | None = None  # int4: input columns per scale (32, 64, 128, 256); None: 64
    quantize_lm_head: bool = True  # with quantization, the LM head and embedding table too (int8)
    compile: bool = False  # torch.compile the decode step: faster decode after a slower first start
    enforce_eager: bool = False  # on a GPU: no CUDA graphs, each decode step's kernels launched one by one
    seed: int | None = None  # seeds the requests that bring no seed of their own
    revision: str | None = None  # hub revision
    # speculative decoding, as vLLM's: {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
    # or a draft model of the same tokenizer: {"model": "path/to/small-draft", "num_speculative_tokens": 4}
    speculative_config: SpeculativeConfig | dict | None = None
    # ranks that split the model's heads and columns (lmgen/distributed): processes lmgen starts, or torchrun's
    tensor_parallel_size: int = 1
    # on a CPU: memory-map the weights from a file prepared on the first such load (lmgen/loader/mapped.py), so
    # loading is instant and only the pages read become resident (a mixture of experts': the chosen experts)
    map_weights: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise InvalidArgumentError(
                f"dtype {self.dtype!r} is not supported; use one of: auto, float32, bfloat16, float16")
        if str(self.kv_cache_dtype).startswith("fp8"):
            raise InvalidArgumentError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported: lmgen does not store "
                                       "fp8 keys and values yet; use auto, float16, bfloat16 or float32")
        if self.kv_cache_dtype not in ("auto", *DTYPES):
            raise InvalidArgumentError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; use one of: auto, "
                                       "float16, bfloat16, float32")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise InvalidArgumentError(f"device {self.device!r} is not supported; use auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {self.device!r} was asked for but no CUDA GPU is available; use cpu")
        self.quant_config()  # validates the quantization settings
        object.__setattr__(self, "speculative_config", SpeculativeConfig.of(self.speculative_config))
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise InvalidArgumentError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_num_partial_prefills",
                     "block_size", "tensor_parallel_size"):
            _positive(name, getattr(self, name))
        if self.tensor_parallel_size > 1 and self.map_weights:
            raise InvalidArgumentError("map_weights=True does not apply with tensor_parallel_size > 1 (each rank "
                                       "holds its own share): drop one of them")
        if self.tensor_parallel_size > 1 and self.compile:
            raise InvalidArgumentError("compile=True does not apply with tensor_parallel_size > 1 (the ranks' "
                                       "all-reduces sit between the compiled layers): drop one of them")
        if self.kv_cache_memory is not None and parse_size(self.kv_cache_memory) <= 0:
            raise InvalidArgumentError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")

    def quant_config(self) -> QuantConfig | None:
        """The requested quantization (a quantized checkpoint brings its own: see Engine)."""
        if self.quantization is None:
            return None
        return QuantConfig(self.quantization, self.quantization_group_size or DEFAULT_GROUP_SIZE,
                           self.quantize_lm_head)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
        """The dtype to run in: the caller's; for "auto" the checkpoint's (float32 if it names none),
        except that half precision becomes float32 on a CPU without units for it, where it is slower."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        dtype = DTYPES.get(str(checkpoint_dtype), torch.float32)
        return compute_dtype(dtype, device)

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache stores keys and values in: the caller's, for "auto" the one the model runs in.
        Attention reads them back into the model's dtype (or float32), so only their storage is rounded."""
        return model_dtype if self.kv_cache_dtype == "auto" else DTYPES[self.kv_cache_dtype]
