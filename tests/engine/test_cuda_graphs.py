"""Decode steps replayed from recorded graphs against the same steps launched eagerly.

On a GPU the engine records real CUDA graphs. On a CPU the tests record with a stand-in
that runs the step as it is, so what they check here is everything around the graph:
buckets, static inputs, padding rows and the scratch block they write to.
"""

import pytest
import torch

from checkpoints import MOE_VARIANTS
from conftest import ALL_VARIANTS
from lmgen import LLM, SamplingParams, kernels
from lmgen.engine import cuda_graphs

PROMPTS = [list(range(3 + i, 3 + i + length)) for i, length in enumerate([5, 19, 40, 7, 12, 33, 9, 26] * 2)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def recorded(monkeypatch):
    """The buckets recorded, in order; on a CPU, graphs that run their step eagerly, and attention
    through PyTorch as on a GPU (lmgen's CPU kernels read the cache without masks)."""
    buckets = []

    def stand_in(device):
        def record(step):
            buckets.append(step)
            return step
        return record

    if not ON_GPU:
        monkeypatch.setitem(cuda_graphs.RECORDERS, "cpu", stand_in)
        monkeypatch.setattr(kernels, "loaded", False)
    else:
        real = cuda_graphs.RECORDERS["cuda"]

        def counting(device):
            record = real(device)

            def count(step):
                buckets.append(step)
                return record(step)
            return count

        monkeypatch.setitem(cuda_graphs.RECORDERS, "cuda", counting)
    return buckets


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if v != "llama-dynamic-rope" and v not in MOE_VARIANTS])
def test_replayed_decode_gives_the_eager_tokens(checkpoint_factory, variant, recorded):
    path = str(checkpoint_factory(variant))
    eager = LLM(path, dtype="float32", enforce_eager=True, block_size=4)
    assert not recorded
    graphed = LLM(path, dtype="float32", block_size=4)  # blocks of 4: the block-table width crosses buckets
    for batch in (PROMPTS[:1], PROMPTS[:3], PROMPTS):  # batch sizes 1, 3 (padded to 4) and 16, mixed lengths
        assert greedy_tokens(graphed, batch) == greedy_tokens(eager, batch)
    # (rows, width) buckets: (1, 2) and (1, 4) as the lone request grows from 6 to 16 tokens, (4, 16) and
    # (16, 16) for the batches whose longest request holds 41 to 52 tokens
    assert len(recorded) == 4
    graphs = len(recorded)
    greedy_tokens(graphed, PROMPTS[:3])
    assert len(recorded) == graphs  # a bucket is recorded once


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_replayed_decode_of_quantized_weights_gives_the_eager_tokens(llama_path, quantization):
    eager = LLM(str(llama_path), dtype="bfloat16", quantization=quantization, enforce_eager=True)
    graphed = LLM(str(llama_path), dtype="bfloat16", quantization=quantization)
    assert greedy_tokens(graphed, PROMPTS) == greedy_tokens(eager, PROMPTS)


def test_padding_rows_never_touch_a_request_blocks_under_preemption(llama_path):
    """A cache so small that requests are preempted and blocks reused: every block the pool hands
    out may be read by some request, so a padding row writing into one would change tokens."""
    small = dict(dtype="float32", block_size=4, kv_cache_memory=48 * 4 * 2 * 2 * 2 * 16 * 4)
    eager = LLM(str(llama_path), enforce_eager=True, **small)
    graphed = LLM(str(llama_path), **small)
    assert graphed.engine.pool.num_blocks == eager.engine.pool.num_blocks - 1  # the scratch block
    assert greedy_tokens(graphed, PROMPTS[:5]) == greedy_tokens(eager, PROMPTS[:5])


@pytest.mark.parametrize("variant", ["llama-dynamic-rope", "qwen3-moe"])  # experts chosen on the host each step
def test_rope_that_depends_on_the_context_length_or_routing_runs_eagerly(checkpoint_factory, recorded, variant):
    llm = LLM(str(checkpoint_factory(variant)), dtype="float32")
    assert llm.engine.runner.graphs is None
    greedy_tokens(llm, PROMPTS[:3])
    assert not recorded


def test_buckets_are_powers_of_two_up_to_the_most():
    assert [cuda_graphs.bucket(n, 48) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]


def test_compile_gives_way_to_graphs_unless_eager_is_enforced(llama_path, caplog):
    """Compiled steps replayed slower than the eager step's graphs on an H200 (docs/performance.md)."""
    graphed = LLM(str(llama_path), dtype="float32", compile=True)
    assert "compile=True is ignored" in caplog.text
    assert greedy_tokens(graphed, PROMPTS[:3]) == greedy_tokens(LLM(str(llama_path), dtype="float32"), PROMPTS[:3])
