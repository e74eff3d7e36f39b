"""Weights memory-mapped from a file prepared once, so that only the pages a step reads become resident.

A checkpoint's tensors rarely lie as lmgen's kernels read them (q/k/v and gate/up fused, a layer's
experts stacked [E, out, in], int4 interleaved), so the model's parameters cannot be views of its
safetensors or GGUF file. With ``map_weights``, the first load fills the parameters as usual (read,
quantized, packed) but in a shared writable mapping of a new file, which so receives them in the
layout the kernels read without the weights ever taking anonymous memory; every load then maps that
file privately (copy on write): loading reads nothing, and the weights are pages of the file that the
OS reads on first use and may drop again under memory pressure, as with llama.cpp's mmap of a GGUF
file. A mixture of experts' resident set is then its dense weights and the experts its tokens chose.
The file takes as much disk as the weights would take memory. The mapping is not advised
``MADV_HUGEPAGE`` (as lmgen's own weight memory is, lmgen/huge_pages.py): Linux then reads the file
in 2 MiB pages, which doubled what a token of the MoE bench model made resident (775 MiB against
390; docs/performance-log.md).

Layout: ``MAGIC``, the header's length (u64, little-endian), the header (JSON: each parameter's
dtype, shape and byte offset from the data's start), then the data from a page boundary, each tensor
on a cache line. A file is named by a digest of what decides its contents (``prepared_path``), under
``$LMGEN_CACHE/weights`` (default ``~/.cache/lmgen/weights``), and written under a temporary name,
then linked to its own: a file under its final name was whole, and mapping checks it still is
(reading past the end of a mapped file kills the process).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmgen import disk_cache
from lmgen.errors import UnsupportedModelError

MAGIC = b"LMGENMAP"
FORMAT_VERSION = 1  # in every file's digest: a new layout or header prepares files anew
_PREFIX = len(MAGIC) + 8
_ALIGNMENT = 64  # a cache line


def prepared_path(name: str, identity: dict) -> Path:
    """The prepared file of model `name` for `identity` (JSON data: what decides the parameters' contents)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True).encode()).hexdigest()
    return disk_cache.directory("weights") / f"{name}-{digest[:20]}.weights"


def file_layout(model: nn.Module) -> tuple[bytes, int]:
    """The header of the model's prepared file and the file's size in bytes."""
    tensors, offset = {}, 0
    for name, param in model.named_parameters():
        tensors[name] = {"dtype": _dtype_name(param.dtype), "shape": list(param.shape), "offset": offset}
        offset += -(-param.nbytes // _ALIGNMENT) * _ALIGNMENT
    header = json.dumps({"tensors": tensors}).encode()
    return header, _data_start(len(header)) + offset


def prepare(file: Path, model: nn.Module, fill: Callable[[], None]) -> None:
    """Write `file`: the model's parameters become views of a shared mapping of it, in which `fill()`
    loads (and packs) them. The parameters stay views of that mapping (map them with ``map_prepared``)."""
    header, size = file_layout(model)
    file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=file.parent, prefix=f"{file.name}.", suffix=".partial") as partial:
        partial.truncate(size)
        partial.write(MAGIC + struct.pack("<Q", len(header)) + header)
        partial.flush()
        region = mmap.mmap(partial.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        memory = torch.frombuffer(region, dtype=torch.uint8)
        _place(model, memory, json.loads(header)["tensors"], _data_start(len(header)))
        fill()
        moved = [name for name, p in model.named_parameters() if p.untyped_storage().data_ptr() != memory.data_ptr()]
        if moved:
            raise UnsupportedModelError(f"map_weights: packing gave {', '.join(moved[:3])} memory of their own, "
                                        "which cannot be mapped (int4 needs lmgen's CPU kernels)")
        region.flush()  # on disk before the file is under its name
        try:
            os.link(partial.name, file)
        except FileExistsError:  # another process prepared it meanwhile: the same contents
            pass


def map_prepared(file: Path, model: nn.Module) -> None:
    """Make the model's parameters views of a private, copy-on-write mapping of its prepared `file`,
    checked to hold every parameter as the model has it, and whole."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(_PREFIX)
        if not prefix.startswith(MAGIC) or len(prefix) < _PREFIX:
            raise _stale(file, "it is not a file of weights lmgen prepared")
        (header_len,) = struct.unpack("<Q", prefix[len(MAGIC):])
        header = f.read(header_len) if header_len <= size - _PREFIX else b""
        try:
            tensors = json.loads(header)["tensors"]
        except (ValueError, KeyError, TypeError):
            raise _stale(file, f"it is truncated ({size} bytes) or damaged: its header does not read") from None
        start = _data_start(header_len)
        _check_matches(file, model, tensors)
        needed = max((start + e["offset"] + p.nbytes for e, p in zip(tensors.values(), model.parameters())),
                     default=start)
        if size < needed:
            raise _stale(file, f"it is truncated: it has {size} bytes, its weights need {needed}")
        region = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    _place(model, torch.frombuffer(region, dtype=torch.uint8), tensors, start)


def _check_matches(file: Path, model: nn.Module, tensors: dict) -> None:
    """Refuse a file whose tensors are not the model's parameters, in order, of the same dtypes and shapes."""
    params = dict(model.named_parameters())
    if list(tensors) != list(params):
        raise _stale(file, "it holds other tensors than the model's parameters")
    for name, entry in tensors.items():
        param = params[name]
        if entry.get("dtype") != _dtype_name(param.dtype) or entry.get("shape") != list(param.shape):
            raise _stale(file, f"it holds {name} as {entry.get('dtype')} {entry.get('shape')}, the model as "
                               f"{_dtype_name(param.dtype)} {list(param.shape)}")


def _place(model: nn.Module, memory: torch.Tensor, tensors: dict, start: int) -> None:
    """Point each parameter at its bytes in `memory` (the whole file; the data from `start`)."""
    for name, param in model.named_parameters():
        first = start + tensors[name]["offset"]
        param.data = memory[first:first + param.nbytes].view(param.dtype).view(param.shape)


def _data_start(header_len: int) -> int:
    return -(-(_PREFIX + header_len) // mmap.PAGESIZE) * mmap.PAGESIZE


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stale(file: Path, fault: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{file} cannot be mapped: {fault}; delete it, and the next load with "
                                 "map_weights prepares it again")
