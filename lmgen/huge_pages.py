"""Memory backed by 2 MiB pages for what a CPU decode step streams: the weights and the KV cache.

Batch-1 decode reads every weight from DRAM once per token, and attention reads each
request's cached K/V rows, one head's row per position, scattered over its blocks. With
the usual 4 KiB pages the CPU's prefetchers stop at every page boundary and the TLB misses
every 4 KiB: lmgen's products read bench-125m's weights 6-12% faster from memory that Linux
backs with transparent huge pages (measured side by side in one process). Linux gives those
pages only to 2 MiB-aligned memory a process asks for by ``madvise``, which PyTorch's
allocator does not do for tensors of a few MiB, so this memory is a mapping of its own.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Collection

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20
_ALIGNMENT = 64  # a cache line: no tensor shares one with another, every vector load is aligned


def tensors_in_huge_pages(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor] | None:
    """Zero-filled CPU tensors of these (shape, dtype)s, one after another (each on a cache line) in one
    anonymous mapping advised ``MADV_HUGEPAGE``; None where the OS has no such advice. Pages not yet
    written take no memory."""
    if not specs or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    sizes = [dtype.itemsize * math.prod(shape) for shape, dtype in specs]
    offsets = [0]
    for nbytes in sizes:
        offsets.append(offsets[-1] + -(-nbytes // _ALIGNMENT) * _ALIGNMENT)
    region = mmap.mmap(-1, offsets[-1] + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first write: each 2 MiB is then faulted in as one page
    memory = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping for as long as any view lives
    start = -memory.data_ptr() % HUGE_PAGE
    return [memory[start + offset:start + offset + nbytes].view(dtype).view(shape)
            for (shape, dtype), offset, nbytes in zip(specs, offsets, sizes)]


def place_weights_in_huge_pages(model: nn.Module, besides: Collection[nn.Parameter] = ()) -> None:
    """Give the model's CPU parameters, but those in `besides`, new memory in one mapping backed by huge pages.

    Their contents are not kept: call after building the model and before loading its weights,
    so that the memory PyTorch allocated for them was never touched (never resident) and the
    weights are written once, into the huge pages. Does nothing where the OS has no
    ``madvise(MADV_HUGEPAGE)``.
    """
    kept = {id(p) for p in besides}
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.numel() and id(p) not in kept]
    tensors = tensors_in_huge_pages([(tuple(p.shape), p.dtype) for p in params])
    if tensors is None:
        return
    for param, tensor in zip(params, tensors):
        param.data = tensor
    logger.debug("%d weights placed in huge pages", len(params))
