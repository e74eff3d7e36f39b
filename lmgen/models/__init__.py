"""Model registry: the ``architectures`` name of config.json -> implementation.

Adding a family is one file in this folder and one line here.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch

from lmgen.errors import UnsupportedModelError

# architecture name -> "module:class"
_REGISTRY = {
    "LlamaForCausalLM": "lmgen.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lmgen.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "lmgen.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "lmgen.models.qwen3:Qwen3ForCausalLM",
    "Gemma2ForCausalLM": "lmgen.models.gemma:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "lmgen.models.gemma:Gemma3ForCausalLM",
    "Phi3ForCausalLM": "lmgen.models.phi3:Phi3ForCausalLM",
    "Olmo2ForCausalLM": "lmgen.models.olmo2:Olmo2ForCausalLM",
    "GraniteForCausalLM": "lmgen.models.granite:GraniteForCausalLM",
    "SmolLM3ForCausalLM": "lmgen.models.smollm3:SmolLM3ForCausalLM",
    "GPT2LMHeadModel": "lmgen.models.gpt2:GPT2LMHeadModel",
    "MixtralForCausalLM": "lmgen.models.mixtral:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "lmgen.models.qwen_moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "lmgen.models.qwen_moe:Qwen3MoeForCausalLM",
    "OlmoeForCausalLM": "lmgen.models.olmoe:OlmoeForCausalLM",
    "GptOssForCausalLM": "lmgen.models.gpt_oss:GptOssForCausalLM",
}

SUPPORTED_ARCHITECTURES = tuple(_REGISTRY)


def model_class(config: dict) -> type:
    """The class implementing the checkpoint's architecture (imported on demand)."""
    names = config.get("architectures") or []
    for name in names:
        if name in _REGISTRY:
            module, cls = _REGISTRY[name].split(":")
            return getattr(importlib.import_module(module), cls)
    raise UnsupportedModelError(
        f"architecture {', '.join(names) or '(none given in config.json)'} is not supported; "
        f"lmgen runs: {', '.join(SUPPORTED_ARCHITECTURES)}")


@contextlib.contextmanager
def build_context(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside allocate their (uninitialised) parameters on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)
