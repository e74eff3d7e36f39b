"""Tensor parallelism on a CPU (gloo, two processes): the same greedy tokens as one rank, transformers' logits.

The worker process is spawned once and serves each test's engine in turn (a process's workers are
reused: engines are closed at the end of each test); the killed-worker test comes last.
"""

import os
import signal

import pytest
import torch
import transformers

from checkpoints import build_checkpoint
from conftest import ALL_VARIANTS
from lmgen import LLM, AutoModelForCausalLM, SamplingParams
from lmgen.distributed.parallel import TensorParallelError
from lmgen.errors import InvalidArgumentError, UnsupportedModelError

PROMPTS = [[1, 5, 9, 200, 17, 33, 45], [1, 100, 7], list(range(3, 40)), [1, 250, 251, 252, 253, 254, 300]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def one_kv_head_path(tmp_path_factory):
    """Llama with 4 attention heads sharing 1 key/value head: fewer KV heads than ranks."""
    return build_checkpoint(tmp_path_factory.mktemp("llama-1kv"), "llama", num_key_value_heads=1)


def greedy_tokens(llm: LLM) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("variant, quantization", [
    *[(variant, {}) for variant in ALL_VARIANTS],  # gpt-oss: sinks split with the heads, biases added once
    ("qwen3", dict(quantization="int8")),
    ("llama-1kv", dict(quantization="int4", quantization_group_size=32))])  # o_proj: 32 input columns a rank
def test_two_ranks_choose_the_tokens_of_one(checkpoint_factory, one_kv_head_path, variant, quantization):
    path = str(one_kv_head_path if variant == "llama-1kv" else checkpoint_factory(variant))
    args = dict(dtype="float32", device="cpu", **quantization)
    whole = LLM(path, **args)
    expected = greedy_tokens(whole)
    split = LLM(path, tensor_parallel_size=2, **args)
    try:
        assert split.engine.model.spec.num_kv_heads == max(whole.engine.model.spec.num_kv_heads // 2, 1)
        assert greedy_tokens(split) == expected
    finally:
        split.engine.close()


def test_a_preempted_batch_and_forked_sequences_match_one_rank(llama_path):
    """A cache too small for the batch preempts requests; n=2 sequences copy a shared block (copy on write)."""
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 16 floats
    args = dict(dtype="float32", device="cpu", max_num_seqs=4)
    params = [GREEDY] * len(PROMPTS) + [SamplingParams(max_tokens=24, temperature=0.8, seed=5, n=2)]
    prompts = [*PROMPTS, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    one = LLM(str(llama_path), kv_cache_memory=8 * block_bytes, **args)
    expected = [[c.token_ids for c in output.outputs] for output in one.generate(prompts, params)]
    # kv_cache_memory is each rank's, whose blocks hold half the KV heads: as many blocks in half the bytes
    split = LLM(str(llama_path), tensor_parallel_size=2, kv_cache_memory=4 * block_bytes, **args)
    try:
        assert split.engine.kv_cache.num_blocks == one.engine.kv_cache.num_blocks == 8
        assert [[c.token_ids for c in output.outputs] for output in split.generate(prompts, params)] == expected
        assert split.engine.scheduler.num_preemptions == one.engine.scheduler.num_preemptions > 0
    finally:
        split.engine.close()


def test_logits_match_transformers(checkpoint_factory):
    path = checkpoint_factory("qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    split = LLM(str(path), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        for prompt, logits in zip(PROMPTS, split.engine.score(PROMPTS)):
            with torch.no_grad():
                reference = hf(torch.tensor([prompt])).logits[0]
            assert logits.shape == reference.shape
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    finally:
        split.engine.close()


def test_the_drop_in_splits_with_transformers_tp_plan(llama_path):
    ids = torch.tensor([PROMPTS[0]])
    expected = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32, device_map="cpu").generate(
        ids, max_new_tokens=12, do_sample=False)
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32, device_map="cpu", tp_plan="auto",
                                                 tp_size=2)
    try:
        assert model.llm.engine.config.tensor_parallel_size == 2
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    finally:
        model.llm.engine.close()
    with pytest.raises(InvalidArgumentError, match="tp_plan 'colwise'"):
        AutoModelForCausalLM.from_pretrained(llama_path, tp_plan="colwise")


def test_sizes_the_ranks_cannot_share_are_refused_before_any_process_starts(llama_path):
    with pytest.raises(UnsupportedModelError, match="tensor_parallel_size 3 does not divide the model's 4 attention"):
        LLM(str(llama_path), device="cpu", tensor_parallel_size=3)
    with pytest.raises(InvalidArgumentError, match="tensor_parallel_size must be a positive integer"):
        LLM(str(llama_path), device="cpu", tensor_parallel_size=0)
    with pytest.raises(InvalidArgumentError, match="compile=True"):
        LLM(str(llama_path), device="cpu", tensor_parallel_size=2, compile=True)


def test_a_second_engine_waits_for_the_first_to_close(llama_path):
    threads = torch.get_num_threads()
    first = LLM(str(llama_path), dtype="float32", device="cpu", tensor_parallel_size=2)
    assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)  # rank 0's share of the cores
    with pytest.raises(InvalidArgumentError, match="close that engine first"):
        LLM(str(llama_path), dtype="float32", device="cpu", tensor_parallel_size=2)
    first.engine.close()
    assert torch.get_num_threads() == threads  # given back
    with pytest.raises(TensorParallelError, match="closed"):
        first.generate(PROMPTS[0], GREEDY)


def test_a_killed_worker_fails_the_engine_with_an_error(llama_path):
    """Last: it kills this process's worker (the next tensor-parallel engine would start a new one)."""
    split = LLM(str(llama_path), dtype="float32", device="cpu", tensor_parallel_size=2)
    stream = split.stream(PROMPTS, GREEDY)
    next(stream)
    (worker,) = split.engine.model.ranks.processes
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match="worker rank 1 exited"):
        for _ in stream:
            pass
    with pytest.raises(TensorParallelError, match="worker rank 1 exited"):  # and every later request
        split.generate(PROMPTS[0], GREEDY)
