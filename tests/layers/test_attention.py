"""Attention with sinks (GPT-OSS) and soft-capped scores (Gemma 2) against the whole score matrix."""

import pytest
import torch

from lmgen.layers import attention
from lmgen.layers.attention import attention_beyond_sdpa


def score_matrix_attention(q, k, v, mask, scale, softcap, sinks):
    """Every score of every head at once, the sink a column of its own: the obvious reference, in float32."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.float(), k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return scores.softmax(dim=-1) @ v
    sink_column = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
    return torch.cat((scores, sink_column), dim=-1).softmax(dim=-1)[..., :-1] @ v


def prefill_mask(query_starts, seq_lens, num_queries, num_keys, window):
    """[B, 1, Q, S]: causal (within `window` keys when given) over each request's context; padded rows repeat
    the last real one, as AttentionMetadata.build_masks makes them."""
    q_pos = torch.minimum(query_starts[:, None] + torch.arange(num_queries), seq_lens[:, None] - 1)
    k_pos = torch.arange(num_keys)
    allowed = k_pos <= q_pos[..., None]
    if window is not None:
        allowed &= k_pos > q_pos[..., None] - window
    return allowed[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("softcap, with_sinks", [(None, True), (2.0, False), (2.0, True)])
def test_sinks_and_soft_caps_equal_the_score_matrix(monkeypatch, dtype, window, softcap, with_sinks):
    monkeypatch.setattr(attention, "SCORES_PER_CHUNK", 2 * 4 * 3 * 40)  # 3 query rows a block: 13 is 3+3+3+3+1
    torch.manual_seed(0)
    q = (torch.randn(2, 13, 4, 32) * 2).to(dtype).transpose(1, 2)  # [B, H, Q, D] as paged_attention lays it out
    k, v = ((torch.randn(2, 2, 40, 32) * 2).to(dtype) for _ in range(2))
    sinks = torch.tensor([3.0, -1.0, 0.5, 8.0]) if with_sinks else None
    mask = prefill_mask(torch.tensor([0, 20]), torch.tensor([13, 33]), 13, 40, window)
    out = attention_beyond_sdpa(q, k, v, mask, 0.25, softcap, sinks)
    expected = score_matrix_attention(q, k, v, mask, 0.25, softcap, sinks)
    assert out.dtype == dtype and out.shape == expected.shape
    # bfloat16 products round scores to 2^-8 of their size (the score-matrix route in bfloat16 misses by as much)
    tolerance = 1e-5 if dtype == torch.float32 else expected.abs().max().item() / 128
    assert (out.float() - expected).abs().max().item() <= tolerance
    if with_sinks:  # the sinks weigh far beyond the tolerance
        without = score_matrix_attention(q, k, v, mask, 0.25, softcap, None)
        assert (without - expected).abs().max().item() > 10 * tolerance


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("softcap, with_sinks", [(None, False), (None, True), (2.0, False)])
def test_prompt_chunks_deep_in_their_context_attend_over_their_window(window, softcap, with_sinks):
    """Two requests' prompt chunks (20 and 17 tokens, past the decode kernel's rows) at positions 30 and 45:
    a sliding layer reads the blocks its window reaches, and every token's output is the reference's over
    exactly the keys it may see."""
    torch.manual_seed(0)
    block_size, num_kv_heads, head_dim = 4, 2, 16
    k_cache, v_cache = (torch.randn(40, block_size, num_kv_heads, head_dim) for _ in range(2))
    tables = torch.randperm(39)[:32].add(1).view(2, 16)  # block 0 pads nothing here
    starts, lens = torch.tensor([30, 45]), torch.tensor([50, 62])
    token_request = torch.repeat_interleave(torch.arange(2), lens - starts)
    token_offset = torch.cat([torch.arange(int(n)) for n in lens - starts])
    positions = starts[token_request] + token_offset
    slots = tables[token_request, positions // block_size] * block_size + positions % block_size
    meta = attention.AttentionMetadata(slots, tables, starts, lens, token_request, token_offset,
                                       max_query_len=20, block_size=block_size)
    meta.build_masks({window})
    q = torch.randn(37, 4, head_dim)
    k, v = (torch.randn(37, num_kv_heads, head_dim) for _ in range(2))
    sinks = torch.tensor([3.0, -1.0, 0.5, 2.0]) if with_sinks else None
    out = attention.paged_attention(q, k, v, (k_cache, v_cache), meta, 0.25, window, softcap, sinks)
    for t in range(37):
        b, p = int(token_request[t]), int(positions[t])
        first = 0 if window is None else max(0, p - window + 1)
        keys, values = (c[tables[b]].reshape(-1, num_kv_heads, head_dim)[first:p + 1].transpose(0, 1)[None]
                        for c in (k_cache, v_cache))
        mask = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
        expected = score_matrix_attention(q[t][None, :, None], keys, values, mask, 0.25, softcap, sinks)[0, :, 0]
        assert torch.allclose(out[t], expected, atol=1e-5), t
    if window is not None:
        assert attention._first_block_seen(meta, window) == 6
