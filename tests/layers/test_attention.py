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
