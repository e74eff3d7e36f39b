"""Huge pages: every CPU weight moves into one 2 MiB-aligned mapping, shapes kept; so does the KV cache."""

import mmap

import pytest
import torch
from torch import nn

from lmgen import LLM
from lmgen.huge_pages import HUGE_PAGE, place_weights_in_huge_pages

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="needs Linux's madvise(MADV_HUGEPAGE)")


def test_weights_move_into_one_aligned_mapping_with_their_shapes_and_dtypes():
    # parameter sizes that are no multiple of 64 bytes
    model = nn.Sequential(nn.Linear(7, 5), nn.Embedding(3, 9).to(torch.bfloat16), nn.Linear(7, 5, bias=False))
    model[2].weight = model[0].weight  # tied: moved once
    shapes = [(p.shape, p.dtype) for p in model.parameters()]
    place_weights_in_huge_pages(model)
    params = list(model.parameters())
    assert [(p.shape, p.dtype) for p in params] == shapes
    assert params[0].data_ptr() % HUGE_PAGE == 0
    assert all(p.is_contiguous() and p.data_ptr() % 64 == 0 for p in params)
    ends = [(p.data_ptr(), p.data_ptr() + p.nbytes) for p in params]
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ends, ends[1:]))  # apart, in order
    assert ends[-1][1] - ends[0][0] < HUGE_PAGE  # one mapping


def test_a_loaded_model_keeps_its_weights_and_kv_cache_in_huge_pages_and_generates():
    llm = LLM(dtype="float32")  # the demo model
    params = list(llm.engine.model.parameters())
    start = params[0].data_ptr()
    assert start % HUGE_PAGE == 0
    total = sum(p.nbytes for p in params)
    assert all(start <= p.data_ptr() < start + total + 64 * len(params) for p in params)
    k_cache, v_cache = llm.engine.kv_cache.layers[0]
    assert k_cache.data_ptr() % HUGE_PAGE == 0 and v_cache.data_ptr() == k_cache.data_ptr() + k_cache.nbytes
    assert not k_cache.any()  # zeros, as torch.zeros gave
    assert llm.generate(["Once upon a time"])[0].outputs[0].token_ids
