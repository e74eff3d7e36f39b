"""A checkpoint (a folder, or a GGUF file) -> a ready model: built, quantized, placed, loaded and packed.

The engine receives the result and never reaches back into loading.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmgen import kernels
from lmgen.errors import InsufficientMemoryError
from lmgen.huge_pages import place_weights_in_huge_pages
from lmgen.layers.ggml import prepare_ggml
from lmgen.layers.ggml_recipes import RECIPES, quantize_to_blocks, recipe_types
from lmgen.layers.quant import QuantConfig, pack_quantized, prepare_quantized, quantize_tensors, resolve_quantization
from lmgen.loader.checkpoint import is_gguf_file, iter_tensors, load_weights, read_json
from lmgen.loader.gguf import GGUFCheckpoint
from lmgen.loader.gguf_tokenizer import gguf_tokenizer
from lmgen.loader.tokenizer import Tokenizer
from lmgen.models import build_context, model_class
from lmgen.models.contract import CausalLM, ModelSpec, check_contract
from lmgen.progress import progress

if TYPE_CHECKING:
    from lmgen.distributed.sharding import Shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A model's source, read but for its weights: config.json, generation_config.json, the tokenizer."""

    path: Path  # a checkpoint folder or a GGUF file
    hf_config: dict
    generation_config: dict
    tokenizer: Tokenizer
    gguf: GGUFCheckpoint | None = None  # the file's header, when the source is a GGUF file


def read_checkpoint(path: Path) -> Checkpoint:
    """The config, generation config and tokenizer of a folder, or of a GGUF file's metadata."""
    if is_gguf_file(path):
        gguf = GGUFCheckpoint.open(path)
        return Checkpoint(path, gguf.hf_config(), gguf.generation_config(), gguf_tokenizer(gguf), gguf)
    return Checkpoint(path, read_json(path, "config.json", required=True), read_json(path, "generation_config.json"),
                      Tokenizer.from_pretrained(path))


def read_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a folder (tokenizer.json; no config.json needed) or of a GGUF file."""
    return gguf_tokenizer(GGUFCheckpoint.open(path)) if is_gguf_file(path) else Tokenizer.from_pretrained(path)


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    max_model_len: int  # the longest sequence the engine may run
    quantization: QuantConfig | None  # the quantization in effect


def load_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, max_model_len: int | None = None,
               quantization: QuantConfig | None = None, group_size_given: bool = False,
               shard: Shard | None = None, gguf_blocks: bool = False) -> LoadedModel:
    """Build the checkpoint's model on `device` in `dtype` and fill it from its safetensors or GGUF tensors.

    `quantization` asks for int8/int4 (a checkpoint saved quantized loads as it is saved, and may only
    be asked for the same) or a llama.cpp recipe (q4_k_m: its blocks, where lmgen's CPU kernels run, else
    their values dequantized); `max_model_len` defaults to the checkpoint's context length. With `shard`,
    the model is one rank's share under tensor parallelism (lmgen/distributed/sharding.py). With
    `gguf_blocks`, a GGUF file's linears whose block formats lmgen's CPU kernels read keep them
    (lmgen.layers.ggml), where those kernels run and no quantization is asked for; else every tensor
    is dequantized to `dtype`.
    """
    cls = model_class(checkpoint.hf_config)
    spec = cls.spec_from_config(checkpoint.hf_config)
    max_model_len = max_model_len or spec.context_length
    saved = QuantConfig.from_hf(checkpoint.hf_config)
    quantization = resolve_quantization(quantization, saved, group_size_given)
    rank_spec = spec if shard is None else shard.spec(spec)
    recipe = quantization is not None and quantization.method in RECIPES
    recipe_blocks = recipe and device.type == "cpu" and shard is None and kernels.load()  # a recipe kept as blocks
    check_weights_fit(weights_bytes(cls, rank_spec, max_model_len, dtype, quantization, recipe_blocks), device)
    with build_context(device, dtype):
        model = cls(rank_spec, max_model_len)
    check_contract(model)
    blocks = {}
    if gguf_blocks and checkpoint.gguf is not None and quantization is None and device.type == "cpu" and kernels.load():
        blocks = prepare_ggml(model, checkpoint.gguf.matrix_types())
    tensors = _tensors(checkpoint, cls, dtype, saved is not None, blocks)
    if recipe:
        types, strides = _prepare(model, quantization, recipe_blocks)
        tensors = progress(quantize_to_blocks(tensors, types, strides, dtype), "quantizing", "tensor")
    elif quantization is not None:
        _prepare(model, quantization, recipe_blocks)
        if saved is None:  # quantize each float tensor as it is read (whole: each rank then cuts its part)
            tensors = quantize_tensors(tensors, quantization)
    if shard is not None:
        tensors = shard.tensors(tensors, model, _meta_model(cls, spec, max_model_len, dtype, quantization, False))
    if device.type == "cpu":
        place_weights_in_huge_pages(model)
        kernels.load()  # before packing, which lays int4 weights out for lmgen's kernel if they run
    load_weights(model, tensors)
    pack_quantized(model)
    if shard is not None:
        shard.finish(model, spec)
    return LoadedModel(model.eval(), max_model_len, quantization)


def _tensors(checkpoint: Checkpoint, cls: type, dtype: torch.dtype, saved_quantized: bool,
             gguf_blocks: dict[str, int]) -> Iterable[tuple[str, object]]:
    """The checkpoint's tensors under lmgen's names (lmgen's quantized checkpoints hold them already; a GGUF
    file's named in `gguf_blocks` are read as their blocks)."""
    if checkpoint.gguf is not None:
        return checkpoint.gguf.weights(dtype, gguf_blocks)
    tensors = iter_tensors(checkpoint.path)
    return tensors if saved_quantized else cls.checkpoint_tensors(tensors)


def weights_bytes(cls: type, spec: ModelSpec, max_model_len: int, dtype: torch.dtype,
                  quantization: QuantConfig | None, recipe_blocks: bool = False) -> int:
    """The bytes the model's weights will take, from the model built on the meta device (nothing allocated)."""
    return sum(p.nbytes for p in _meta_model(cls, spec, max_model_len, dtype, quantization, recipe_blocks).parameters())


def _meta_model(cls: type, spec: ModelSpec, max_model_len: int, dtype: torch.dtype,
                quantization: QuantConfig | None, recipe_blocks: bool) -> CausalLM:
    """The model built on the meta device, quantized modules in place: its shapes, nothing allocated."""
    with build_context(torch.device("meta"), dtype):
        model = cls(spec, max_model_len)
    if quantization is not None:
        _prepare(model, quantization, recipe_blocks)
    return model


def _prepare(model: CausalLM, quantization: QuantConfig, recipe_blocks: bool
             ) -> tuple[dict[str, int | None], dict[str, int]]:
    """Swap the modules `quantization` quantizes for quantized ones (a recipe's for block layers where
    `recipe_blocks`). For a recipe, returns the ggml type of each weight and the row stride of those block
    layers hold (prepare_ggml); ({}, {}) for int8/int4."""
    if quantization.method not in RECIPES:
        prepare_quantized(model, quantization)
        return {}, {}
    types = recipe_types(model, quantization.method, quantization.lm_head)
    return types, prepare_ggml(model, types) if recipe_blocks else {}


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
