"""Attention over the paged KV cache, in plain PyTorch (the reference path).

A step's tokens arrive flat ([T, ...], request after request). Each request's new
keys/values are written into its cache slots; then its queries attend over its
whole cached context, gathered from its block table and padded to a rectangle so
one scaled_dot_product_attention call serves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmgen.layers.precision import compute_dtype


@dataclass
class AttentionMetadata:
    """Everything attention needs about a step, built once and shared by all layers.

    Shapes: T tokens in the step, B requests, S = max blocks * block_size keys.
    """

    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] padded with block 0 (masked out)
    query_starts: torch.Tensor  # [B] position of each request's first new token
    seq_lens: torch.Tensor  # [B] tokens in each request's context after this step
    token_request: torch.Tensor  # [T] which request each token belongs to
    token_offset: torch.Tensor  # [T] index of each token among its request's new tokens
    max_query_len: int
    block_size: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # see build_masks

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    def build_masks(self, windows: set[int | None]) -> None:
        """One [B, 1, max_q, S] bool mask per window (None: full causal), made before the forward so
        the layers only look masks up (a compiled forward traces no cache-filling branch)."""
        device = self.block_tables.device
        offsets = torch.arange(self.max_query_len, device=device)
        # Padded query rows are clamped to the last real position so no row is empty (NaN).
        q_pos = torch.minimum(self.query_starts[:, None] + offsets[None, :], self.seq_lens[:, None] - 1)
        k_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=device)
        causal = k_pos[None, None, :] <= q_pos[:, :, None]
        for window in windows:
            allowed = causal if window is None else causal & (k_pos[None, None, :] > q_pos[:, :, None] - window)
            self.masks[window] = allowed[:, None]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D], cache: [num_blocks, block_size, KVH, D] each. Returns [T, H, D]."""
    k_cache, v_cache = kv_cache
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    batch, dtype = meta.block_tables.shape[0], q.dtype
    cdtype = compute_dtype(dtype, q.device)
    # index_select on the flat table: indexing with the 2-D table directly is ~1000x slower on CPU
    blocks = meta.block_tables.flatten()
    keys = k_cache.index_select(0, blocks).to(cdtype).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, blocks).to(cdtype).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    q = q.to(cdtype)  # keys/values: [B, KVH, S, D]
    if meta.decode_only:
        return _decode_attention(q, keys, values, meta.masks[window], scale).to(dtype)
    queries = q.new_zeros(batch, meta.max_query_len, q.shape[1], head_dim)
    queries[meta.token_request, meta.token_offset] = q
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=meta.masks[window], scale=scale,
        enable_gqa=q.shape[1] != num_kv_heads)
    return out.transpose(1, 2)[meta.token_request, meta.token_offset].to(dtype)


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per request, q: [B, H, D], mask [B, 1, 1, S] -> [B, H, D].

    Two batched products and a softmax: with a single query row, scaled_dot_product_attention's
    CPU kernel spends ~80 us per call setting up its blocks, more than the whole computation.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    queries = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # heads sharing a KV head
    scores = torch.matmul(queries, keys.transpose(2, 3)) * scale  # [B, KVH, group, S]
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
    return torch.matmul(weights.to(values.dtype), values).view(batch, num_heads, head_dim)
