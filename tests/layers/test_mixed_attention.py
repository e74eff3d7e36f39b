"""A step mixing short queries (decodes, drafts) with prompt chunks attends as the padded reference does."""

import pytest
import torch

from lmgen.layers.attention import AttentionMetadata, ShortQueries, paged_attention

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # the short queries' half is lmgen's decode kernel

BLOCK_SIZE = 4


def step_metadata(computed: list[int], new: list[int]) -> AttentionMetadata:
    """A step over requests that have `computed` tokens cached and compute `new` more, in private blocks."""
    tables, slots, first_block = [], [], 0
    for done, count in zip(computed, new):
        num_blocks = -(-(done + count) // BLOCK_SIZE)
        blocks = list(range(first_block, first_block + num_blocks))
        first_block += num_blocks
        tables.append(blocks)
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(done, done + count)]
    width = max(map(len, tables))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_starts=torch.tensor(computed), seq_lens=torch.tensor(computed) + torch.tensor(new),
        token_request=torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new)),
        token_offset=torch.cat([torch.arange(count) for count in new]), max_query_len=max(new), block_size=BLOCK_SIZE)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_queries_beside_prompt_chunks_attend_as_the_padded_reference(dtype, window):
    torch.manual_seed(0)
    # decodes, a 3-token draft check, a fresh 20-token prompt, a 17-token chunk after 9 cached, one more decode
    computed, new = [30, 5, 12, 0, 9, 2], [1, 1, 3, 20, 17, 1]
    num_tokens, heads, kv_heads, head_dim = sum(new), 6, 2, 32
    q, k, v = torch.randn(num_tokens, heads, head_dim), *torch.randn(2, num_tokens, kv_heads, head_dim)
    cache = torch.randn(2, 40, BLOCK_SIZE, kv_heads, head_dim).to(dtype)
    split = step_metadata(computed, new)
    split.prepare({window}, head_dim, torch.device("cpu"))
    assert split.short_queries.tokens.tolist() == [0, 1, 2, 3, 4, 42]  # the decodes' and the draft check's tokens
    assert split.short_queries.long.token_request.tolist() == [0] * 20 + [1] * 17
    reference = step_metadata(computed, new)
    reference.build_masks({window})  # no split: every request padded to 20 queries
    outputs = [paged_attention(q, k.to(dtype), v.to(dtype), tuple(cache.clone()), meta, 0.2, window)
               for meta in (split, reference)]
    assert torch.allclose(outputs[0].float(), outputs[1].float(), atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_a_step_of_long_queries_alone_has_no_split():
    assert ShortQueries.of(step_metadata([0, 4], [20, 17])) is None
