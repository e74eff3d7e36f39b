"""Attention over the paged KV cache.

A step's tokens arrive flat ([T, ...], request after request). Each request's new
keys/values are written into its cache slots; then its queries attend over its
whole cached context, gathered from its block table and padded to a rectangle so
one scaled_dot_product_attention call serves the batch (the reference path). A
decode-only step on a CPU with lmgen's kernels reads each request's keys and values
where they lie instead (``torch.ops.lmgen.decode_attention``): no gathered, padded or
upcast copy of every context, which at batch 16 cost more than the layer's products. A step
that mixes both (decodes beside prompt chunks) splits: the short queries' tokens go to the
kernel, the long requests are padded among themselves only (ShortQueries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmgen import kernels
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
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # see build_masks; none for the kernel
    short_queries: ShortQueries | None = None  # a mixed step's split (see prepare)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    def query_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tables [T, max_blocks], lengths [T]): each token's query as a decode row of its own — its
        request's table, the positions up to its own. Causal, since a step writes every new key and value
        into the cache before its attention reads. (Not cached on the object: torch.compile traces a plain
        method whole, where a cached property breaks the graph.)"""
        if self.decode_only:  # one token per request, in order
            return self.block_tables, self.seq_lens
        lens = self.query_starts.index_select(0, self.token_request) + self.token_offset + 1
        return self.block_tables.index_select(0, self.token_request), lens

    def prepare(self, windows: set[int | None], head_dim: int, device: torch.device) -> None:
        """Build what attention reads besides the step's tensors, once before the forward: nothing where
        the kernel attends for every token; the split and the long requests' masks where it attends for
        some (ShortQueries); else the masks."""
        if reads_cache_in_place(self, head_dim, device):
            return
        if kernel_attends(head_dim, device):
            self.short_queries = ShortQueries.of(self)
        if self.short_queries is None:
            self.build_masks(windows)
        else:
            self.short_queries.long.build_masks(windows)

    @property
    def prepared(self) -> bool:
        """Whether prepare built anything (a rank that receives the step's tensors prepares them too)."""
        return bool(self.masks) or self.short_queries is not None

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


@dataclass
class ShortQueries:
    """A step whose requests' queries are both short (decodes, drafts being checked, short chunks) and long
    (prompt chunks): the short ones' tokens attend as decode rows in lmgen's kernel, the long requests
    padded among themselves. Padded together, 64 decodes beside one 128-token chunk made 65 x 128 query
    rows over 65 gathered contexts, 65 of them real: that step cost 2-3x one of the chunk alone."""

    tokens: torch.Tensor  # [Ts] the short queries' tokens among the step's
    tables: torch.Tensor  # [Ts, max_blocks] their requests' block tables
    lens: torch.Tensor  # [Ts] the positions each attends to (up to its own)
    long_tokens: torch.Tensor  # [Tl] the other tokens
    long: AttentionMetadata  # the long requests alone

    @classmethod
    def of(cls, meta: AttentionMetadata) -> ShortQueries | None:
        """The split of a step with both kinds of queries; None if it has no short one."""
        query_lens = meta.seq_lens - meta.query_starts
        short = query_lens <= MAX_QUERY_ROWS_IN_PLACE
        if not short.any():
            return None
        token_short = short.index_select(0, meta.token_request)
        tokens, long_tokens = token_short.nonzero().squeeze(1), (~token_short).nonzero().squeeze(1)
        tables, lens = meta.query_rows()
        long_requests = (~short).nonzero().squeeze(1)
        long_index = (~short).cumsum(0) - 1  # a long request's index among the long ones
        seq_lens = meta.seq_lens.index_select(0, long_requests)
        num_blocks = -(-int(seq_lens.max()) // meta.block_size)  # no padding past the longest long request
        long = AttentionMetadata(
            slot_mapping=meta.slot_mapping.index_select(0, long_tokens),
            block_tables=meta.block_tables.index_select(0, long_requests)[:, :num_blocks],
            query_starts=meta.query_starts.index_select(0, long_requests), seq_lens=seq_lens,
            token_request=long_index.index_select(0, meta.token_request.index_select(0, long_tokens)),
            token_offset=meta.token_offset.index_select(0, long_tokens),
            max_query_len=int(query_lens.index_select(0, long_requests).max()), block_size=meta.block_size)
        return cls(tokens, tables.index_select(0, tokens), lens.index_select(0, tokens), long_tokens, long)


#: Requests that compute no more tokens than this in a step attend with lmgen's decode kernel, every
#: token a decode row of its own (AttentionMetadata.query_rows): decode, speculative drafts being
#: checked, short prompt chunks. Longer queries re-read the context per token: SDPA's blocks win.
MAX_QUERY_ROWS_IN_PLACE = 16


def kernel_attends(head_dim: int, device: torch.device) -> bool:
    """Whether lmgen's decode kernel attends on `device` for heads of `head_dim`."""
    return kernels.serve(device) and head_dim % 16 == 0


def reads_cache_in_place(meta: AttentionMetadata, head_dim: int, device: torch.device) -> bool:
    """Whether the whole step's attention is lmgen's decode kernel, which reads the paged cache where it
    lies and needs no masks."""
    return meta.max_query_len <= MAX_QUERY_ROWS_IN_PLACE and kernel_attends(head_dim, device)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D], cache: [num_blocks, block_size, KVH, D] each. Returns [T, H, D].

    softcap (Gemma 2): each scaled score s becomes softcap * tanh(s / softcap) before the softmax.
    sinks (GPT-OSS): [H] a learned logit per head that joins the softmax's denominator but weighs no value,
    so that a head may attend to nothing."""
    k_cache, v_cache = kv_cache
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    # the cache may store another dtype than the model computes in (kv_cache_dtype): rounded once, on the way in
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    if reads_cache_in_place(meta, head_dim, q.device):
        tables, lens = meta.query_rows()
        return torch.ops.lmgen.decode_attention(q, k_cache, v_cache, tables, lens, scale, window or 0, softcap or 0.0,
                                                sinks)
    split = meta.short_queries
    if split is None:
        return _padded_attention(q, k_cache, v_cache, meta, scale, window, softcap, sinks)
    out = torch.empty_like(q)
    out[split.tokens] = torch.ops.lmgen.decode_attention(q[split.tokens], k_cache, v_cache, split.tables, split.lens,
                                                         scale, window or 0, softcap or 0.0, sinks)
    out[split.long_tokens] = _padded_attention(q[split.long_tokens], k_cache, v_cache, split.long, scale, window,
                                               softcap, sinks)
    return out


def _padded_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, window: int | None, softcap: float | None, sinks: torch.Tensor | None,
                      ) -> torch.Tensor:
    """The reference: each request's context gathered and padded to a rectangle, one SDPA call for all."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    batch, dtype = meta.block_tables.shape[0], q.dtype
    cdtype = compute_dtype(dtype, q.device)
    first_block = _first_block_seen(meta, window)
    # index_select on the flat table: indexing with the 2-D table directly is ~1000x slower on CPU
    blocks = meta.block_tables[:, first_block:].flatten()
    keys = k_cache.index_select(0, blocks).to(cdtype).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, blocks).to(cdtype).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    q = q.to(cdtype)  # keys/values: [B, KVH, S, D]
    if meta.decode_only:
        queries = q.unsqueeze(2)  # [B, H, 1, D]: one token per request, already in order
    else:
        queries = q.new_zeros(batch, meta.max_query_len, q.shape[1], head_dim)
        queries[meta.token_request, meta.token_offset] = q
        queries = queries.transpose(1, 2)
    mask = meta.masks[window][..., first_block * meta.block_size:]
    if softcap or sinks is not None:
        out = attention_beyond_sdpa(queries, keys, values, mask, scale, softcap, sinks)
    else:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[1] != num_kv_heads)
    if meta.decode_only:
        return out.squeeze(2).to(dtype)
    return out.transpose(1, 2)[meta.token_request, meta.token_offset].to(dtype)


def _first_block_seen(meta: AttentionMetadata, window: int | None) -> int:
    """The first block of the step's contexts that a sliding window lets any of its queries see: a prompt
    chunk deep in a long context attends over its window's keys, not the whole context. 0 for decode steps,
    whose masks a recorded CUDA graph replays (the step's positions are never read on the host there)."""
    if window is None or meta.decode_only:
        return 0
    return max(0, int(meta.query_starts.min()) - window + 1) // meta.block_size


#: Scores the explicit route holds at once (a block of query rows against all keys): 64 MiB in float32.
SCORES_PER_CHUNK = 1 << 24


def attention_beyond_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                          softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with soft-capped scores or sinks, which SDPA cannot apply: q [B, H, Q, D], k/v [B, KVH, S, D],
    mask [B, 1, Q, S], sinks [H]. Returns [B, H, Q, D].

    A sink only enlarges each row's softmax denominator: from the output over the real keys and their
    log-sum-exp L, the row with a sink is out * Z / (Z + e^sink) = out * sigmoid(L - sink). So sinks on a CPU
    take torch's flash attention (which returns L) and never hold a score matrix; soft-capping changes each
    score, so it (and sinks elsewhere) takes the explicit route, a block of query rows at a time."""
    if q.device.type == "cpu" and not softcap:
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive,
                                                                              scale=scale)
    else:
        out, lse = _explicit_attention(q, k, v, mask, scale, softcap)
    if sinks is None:
        return out
    return out * torch.sigmoid(lse - sinks.float()[:, None]).unsqueeze(-1).to(out.dtype)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                        softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, Q, D], float32 log-sum-exp [B, H, Q]) from scores made explicitly, at most
    SCORES_PER_CHUNK of them at once. The query heads sharing a key head are folded into its rows, so keys and
    values are never repeated per head."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rows = max(1, SCORES_PER_CHUNK // (batch * num_heads * k.shape[2]))
    out = torch.empty_like(q)
    lse = q.new_empty(batch, num_heads, num_queries, dtype=torch.float32)
    for start in range(0, num_queries, rows):
        chunk = q[:, :, start:start + rows]
        grouped = chunk.reshape(batch, num_kv_heads, -1, head_dim)  # [B, KVH, group * rows, D]
        scores = (grouped @ k.transpose(-1, -2)).float().view(*chunk.shape[:3], -1) * scale  # [B, H, rows, S]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores.masked_fill_(~mask[:, :, start:start + rows], float("-inf"))
        chunk_lse = scores.logsumexp(dim=-1)
        probs = (scores - chunk_lse[..., None]).exp_().to(v.dtype).view(*grouped.shape[:3], -1)
        out[:, :, start:start + rows] = (probs @ v).view(chunk.shape)
        lse[:, :, start:start + rows] = chunk_lse
    return out, lse
