"""A checkpoint folder -> a ready model: built, quantized, placed, loaded and packed.

The engine receives the result and never reaches back into loading.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lmgen import kernels
from lmgen.errors import InsufficientMemoryError
from lmgen.huge_pages import place_weights_in_huge_pages
from lmgen.layers.quant import QuantConfig, pack_quantized, prepare_quantized, quantize_tensors, resolve_quantization
from lmgen.loader.checkpoint import iter_tensors, load_weights
from lmgen.models import build_context, model_class
from lmgen.models.contract import CausalLM, ModelSpec, check_contract

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    max_model_len: int  # the longest sequence the engine may run
    quantization: QuantConfig | None  # the quantization in effect


def load_model(path: Path, hf_config: dict, device: torch.device, dtype: torch.dtype, max_model_len: int | None = None,
               quantization: QuantConfig | None = None, group_size_given: bool = False) -> LoadedModel:
    """Build the checkpoint's model on `device` in `dtype` and fill it from its safetensors files.

    `quantization` asks for int8/int4 (a checkpoint saved quantized loads as it is saved, and may only
    be asked for the same); `max_model_len` defaults to the checkpoint's context length.
    """
    cls = model_class(hf_config)
    spec = cls.spec_from_config(hf_config)
    max_model_len = max_model_len or spec.context_length
    saved = QuantConfig.from_hf(hf_config)
    quantization = resolve_quantization(quantization, saved, group_size_given)
    check_weights_fit(weights_bytes(cls, spec, max_model_len, dtype, quantization), device)
    with build_context(device, dtype):
        model = cls(spec, max_model_len)
    check_contract(model)
    # lmgen's quantized checkpoints hold lmgen's own names (lmgen quantize writes them so)
    tensors = iter_tensors(path) if saved is not None else cls.checkpoint_tensors(iter_tensors(path))
    if quantization is not None:
        prepare_quantized(model, quantization)
        if saved is None:  # quantize each float tensor as it is read
            tensors = quantize_tensors(tensors, quantization)
    if device.type == "cpu":
        place_weights_in_huge_pages(model)
        kernels.load()  # before packing, which lays int4 weights out for lmgen's kernel if they run
    load_weights(model, tensors)
    pack_quantized(model)
    return LoadedModel(model.eval(), max_model_len, quantization)


def weights_bytes(cls: type, spec: ModelSpec, max_model_len: int, dtype: torch.dtype,
                  quantization: QuantConfig | None) -> int:
    """The bytes the model's weights will take, from the model built on the meta device (nothing allocated)."""
    with build_context(torch.device("meta"), dtype):
        model = cls(spec, max_model_len)
    if quantization is not None:
        prepare_quantized(model, quantization)
    return sum(p.nbytes for p in model.parameters())


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (a CPU's MemAvailable: what can be had without swapping); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:  # not Linux
        return None
    return int(found[1]) * 1024 if found else None


def check_weights_fit(needed: int, device: torch.device) -> None:
    """Refuse, before anything is allocated or read, a model whose weights exceed the device's free memory."""
    free = free_memory(device)
    if free is not None and needed > free:
        raise InsufficientMemoryError(
            f"the model's weights need {_size(needed)} but only {_size(free)} of {device.type} memory is free: "
            "quantize them (quantization='int8' or 'int4'), or free memory")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
