"""Per-layer K/V pages, sized from a memory budget."""

from __future__ import annotations

import torch

from lmgen.huge_pages import tensors_in_huge_pages


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block of tokens."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


class KVCache:
    """``layers[i] = (k, v)``, each [num_blocks, block_size, num_kv_heads, head_dim] in `dtype`: the engine's
    kv_cache_dtype, which may differ from the model's (writes round into it, attention reads it back)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        # On a CPU in 2 MiB pages: decode attention reads one head's row per position, scattered over
        # the blocks, and with 4 KiB pages nearly every block it reads misses the TLB.
        tensors = tensors_in_huge_pages([(shape, dtype)] * 2 * num_layers) if device.type == "cpu" else None
        if tensors is None:
            tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.layers = list(zip(tensors[0::2], tensors[1::2]))

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy the K/V of each (source, destination) block pair, in every layer (copy on write)."""
        if not copies:
            return
        sources, destinations = (torch.tensor(column, device=self.layers[0][0].device) for column in zip(*copies))
        for k, v in self.layers:
            k[destinations] = k[sources]
            v[destinations] = v[sources]
