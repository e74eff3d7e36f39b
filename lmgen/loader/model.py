"""A checkpoint (a folder, or a GGUF file) -> a ready model: built, quantized, placed, loaded and packed.

The engine receives the result and never reaches back into loading.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import lmgen
from lmgen import kernels
from lmgen.disk_cache import format_size
from lmgen.errors import InsufficientMemoryError, InvalidArgumentError
from lmgen.huge_pages import place_weights_in_huge_pages
from lmgen.layers.ggml import GGMLEmbedding, prepare_ggml
from lmgen.layers.ggml_recipes import RECIPES, quantize_to_blocks, recipe_types
from lmgen.layers.linear import Embedding
from lmgen.layers.moe import MoE
from lmgen.layers.quant import QuantConfig, pack_quantized, prepare_quantized, quantize_tensors, resolve_quantization
from lmgen.loader import mapped
from lmgen.loader.checkpoint import is_gguf_file, iter_tensors, load_weights, read_json, weight_files
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
        tokenizer = gguf_tokenizer(gguf)
        gguf.drop_string_lists()  # the vocabulary and merges, built into the tokenizer: not held while loading
        return Checkpoint(path, gguf.hf_config(), gguf.generation_config(), tokenizer, gguf)
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
               shard: Shard | None = None, gguf_blocks: bool = False, map_weights: bool = False) -> LoadedModel:
    """Build the checkpoint's model on `device` in `dtype` and fill it from its safetensors or GGUF tensors.

    `quantization` asks for int8/int4 (a checkpoint saved quantized loads as it is saved, and may only
    be asked for the same) or a llama.cpp recipe (q4_k_m: its blocks, where lmgen's CPU kernels run, else
    their values dequantized); `max_model_len` defaults to the checkpoint's context length. With `shard`,
    the model is one rank's share under tensor parallelism (lmgen/distributed/sharding.py). With
    `gguf_blocks`, a GGUF file's linears whose block formats lmgen's CPU kernels read keep them
    (lmgen.layers.ggml), where those kernels run and no quantization is asked for; else every tensor
    is dequantized to `dtype`. With `map_weights` (a CPU, one rank), the weights are memory-mapped from a
    file prepared on the first such load (lmgen/loader/mapped.py).
    """
    if map_weights and (device.type != "cpu" or shard is not None):
        raise InvalidArgumentError("map_weights applies to a model on a CPU without tensor parallelism")
    cls = model_class(checkpoint.hf_config)
    spec = cls.spec_from_config(checkpoint.hf_config)
    max_model_len = max_model_len or spec.context_length
    saved = QuantConfig.from_hf(checkpoint.hf_config)
    quantization = resolve_quantization(quantization, saved, group_size_given)
    rank_spec = spec if shard is None else shard.spec(spec)
    recipe = quantization is not None and quantization.method in RECIPES
    recipe_blocks = recipe and device.type == "cpu" and shard is None and kernels.load()  # a recipe kept as blocks
    file_blocks = (gguf_blocks and checkpoint.gguf is not None and quantization is None and device.type == "cpu"
                   and kernels.load())  # a GGUF file's linears kept in their block formats
    file_types = checkpoint.gguf.matrix_types() if file_blocks else {}
    meta_model = _meta_model(cls, rank_spec, max_model_len, dtype, quantization, recipe_blocks)
    prepare_ggml(meta_model, file_types)  # counted as the blocks they stay
    check_weights_fit(meta_model, device, map_weights)
    with build_context(device, dtype):
        model = cls(rank_spec, max_model_len)
    check_contract(model)
    blocks = prepare_ggml(model, file_types)
    tensors = _tensors(checkpoint, cls, dtype, saved is not None, blocks)
    in_file = (_embeddings_in_file(model, checkpoint.gguf, dtype, blocks) if checkpoint.gguf is not None
               and quantization is None and shard is None and device.type == "cpu" and not map_weights else [])
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
        kernels.load()  # before packing, which lays int4 weights out for lmgen's kernel if they run

    def fill() -> None:
        load_weights(model, tensors)
        pack_quantized(model)

    if map_weights:
        _load_mapped(model, _prepared_file(checkpoint, dtype, quantization, blocks), fill)
    else:
        if device.type == "cpu":
            place_weights_in_huge_pages(model, besides=in_file)
        fill()
    if checkpoint.gguf is not None:
        checkpoint.gguf.drop_pages()
    if shard is not None:
        shard.finish(model, spec)
    return LoadedModel(model.eval(), max_model_len, quantization)


def _embeddings_in_file(model: CausalLM, gguf: GGUFCheckpoint, dtype: torch.dtype, blocks: dict[str, int]
                        ) -> list[nn.Parameter]:
    """Make each embedding table whose bytes in the GGUF file are its values as the model holds them (its
    blocks, or values of its dtype) a view of the file: a lookup reads a few rows, and only their pages
    become resident, pages of the file that the OS may drop again. Not a table tied to the LM head, which
    reads all of it every token (faster from huge pages). The file's pages leave resident memory after each
    lookup: the kernel maps 16 pages of the file around each page read (its fault-around, which MADV_RANDOM
    does not turn off), 64 KiB for a row of a few hundred bytes. Returns the parameters so placed."""
    head = model.model.embed_tokens if model.lm_head is None else None
    tensors, placed = dict(gguf.weights(dtype, blocks)), []
    for name, module in model.named_modules():
        source = tensors.get(f"{name}.weight")
        if isinstance(module, (Embedding, GGMLEmbedding)) and module is not head and source is not None:
            view = source.in_file(module.weight.dtype)
            if view is not None and view.shape == module.weight.shape:
                module.weight.data = view
                module.register_forward_hook(lambda *_: gguf.drop_pages())
                placed.append(module.weight)
    return placed


def _load_mapped(model: CausalLM, file: Path, fill: Callable[[], None]) -> None:
    """Map the model's weights from its prepared `file`, prepared first (by `fill`) if there is none yet."""
    if file.exists():
        logger.info("mapping the weights prepared in %s", file)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        size, free = mapped.file_layout(model)[1], shutil.disk_usage(file.parent).free
        if size > free:
            raise InsufficientMemoryError(f"mapping the model's weights needs a file of {format_size(size)} in "
                                          f"{file.parent} but only {format_size(free)} of disk is free there: free "
                                          "disk space, or load without map_weights")
        logger.info("preparing the weights in %s, to be mapped from there", file)
        mapped.prepare(file, model, fill)
    mapped.map_prepared(file, model)
    pack_quantized(model, laid_out=True)


def _prepared_file(checkpoint: Checkpoint, dtype: torch.dtype, quantization: QuantConfig | None,
                   gguf_blocks: dict[str, int]) -> Path:
    """The file of the model's weights prepared for mapping, named by what decides its contents: each source
    file's path, size and modification time (what tells a changed checkpoint), and how it is loaded."""
    files = [checkpoint.path] if checkpoint.gguf is not None else [checkpoint.path / "config.json",
                                                                   *weight_files(checkpoint.path)]
    sources = [(str(file.resolve()), stat.st_size, stat.st_mtime_ns) for file in files for stat in [file.stat()]]
    return mapped.prepared_path(checkpoint.path.name, dict(
        sources=sources, dtype=str(dtype), quantization=repr(quantization), gguf_blocks=gguf_blocks,
        lmgen=lmgen.__version__, kernels=kernels.loaded and kernels.source_digest()))


def _tensors(checkpoint: Checkpoint, cls: type, dtype: torch.dtype, saved_quantized: bool,
             gguf_blocks: dict[str, int]) -> Iterable[tuple[str, object]]:
    """The checkpoint's tensors under lmgen's names (lmgen's quantized checkpoints hold them already; a GGUF
    file's named in `gguf_blocks` are read as their blocks)."""
    if checkpoint.gguf is not None:
        return checkpoint.gguf.weights(dtype, gguf_blocks)
    tensors = iter_tensors(checkpoint.path)
    return tensors if saved_quantized else cls.checkpoint_tensors(tensors)


def weights_bytes(model: CausalLM, mapped_from_disk: bool = False) -> int:
    """The bytes of the model's weights (built on the meta device: nothing allocated) that become resident:
    all; with `mapped_from_disk`, those every token reads, which stay resident: all but the experts, and of
    each layer's experts as many as a token chooses (top-k)."""
    total = sum(p.nbytes for p in model.parameters())
    if not mapped_from_disk:
        return total
    experts = [(moe.config, sum(p.nbytes for p in moe.experts.parameters()))
               for moe in model.modules() if isinstance(moe, MoE)]
    return total - sum(nbytes * (config.num_experts - config.top_k) // config.num_experts
                       for config, nbytes in experts)


def _meta_model(cls: type, spec: ModelSpec, max_model_len: int, dtype: torch.dtype,
                quantization: QuantConfig | None, recipe_blocks: bool = False) -> CausalLM:
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


def check_weights_fit(model: CausalLM, device: torch.device, map_weights: bool = False) -> None:
    """Refuse, before anything is allocated or read, a model whose weights (resident ones, if mapped
    from disk) exceed the device's free memory; `model` is built on the meta device."""
    free = free_memory(device)
    total, resident = weights_bytes(model), weights_bytes(model, mapped_from_disk=True)
    needed = resident if map_weights else total
    if free is None or needed <= free:
        return
    if map_weights:
        raise InsufficientMemoryError(
            f"the model's weights need {format_size(needed)} resident (of {format_size(total)} mapped from disk and "
            f"paged in as read: what each token reads, all but the experts it does not choose) but only "
            f"{format_size(free)} of {device.type} memory is free: quantize them (quantization='int8' or 'int4'), "
            "or free memory")
    mapping = (f"map them from disk (map_weights=True: {format_size(resident)} resident), "
               if resident <= free and device.type == "cpu" else "")
    raise InsufficientMemoryError(
        f"the model's weights need {format_size(needed)} but only {format_size(free)} of {device.type} memory is "
        f"free: quantize them (quantization='int8' or 'int4'), {mapping}or free memory")
