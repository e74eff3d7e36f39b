"""A decode step's layers in one kernel call (torch.ops.lmgen.decode_layers) against the
layer-by-layer modules: the same kernels in the same order, so the same bits."""

import pytest
import torch

from lmgen import LLM, SamplingParams, kernels
from lmgen.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not kernels.load(), reason="lmgen's CPU kernels need an AVX2 CPU and a C++ compiler")

PROMPTS = [list(range(3 + i, 3 + i + length)) for i, length in enumerate([5, 19, 40])]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)


def _tokens_and_logprobs(llm: LLM) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("variant, dtype, quantization", [
    ("llama", "float32", None), ("llama", "bfloat16", None), ("mistral-sliding", "bfloat16", None),
    ("qwen2", "float32", None),  # q/k/v biases
    ("llama", "bfloat16", "int8"), ("llama", "bfloat16", "int4"),
])
def test_one_call_for_all_layers_gives_the_modules_bits(checkpoint_factory, monkeypatch, variant, dtype, quantization):
    llm = LLM(str(checkpoint_factory(variant)), dtype=dtype, quantization=quantization)
    calls = []
    decode_layers = torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: calls.append(1) or decode_layers(*args),
                        raising=False)
    one_call = _tokens_and_logprobs(llm)
    assert len(calls) == 9, len(calls)  # every decode step: 10 tokens, the first from the prefill
    monkeypatch.setattr(LlamaForCausalLM, "one_call_layers", lambda *_: None)
    assert _tokens_and_logprobs(llm) == one_call


def test_layers_the_kernels_cannot_take_run_module_by_module(checkpoint_factory, monkeypatch):
    llm = LLM(str(checkpoint_factory("llama-untied-bias-headdim")), dtype="float32")  # head_dim 24
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: pytest.fail("called"), raising=False)
    assert llm.generate(PROMPTS, PARAMS)[0].outputs[0].token_ids


def test_steps_whose_layers_run_in_one_call_skip_the_compiled_graph(llama_path):
    llm = LLM(str(llama_path), dtype="float32", compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # eager is faster: nothing compiled


def test_decode_layers_handle_refuses_operands_that_do_not_match_its_layers():
    caches = [torch.zeros(4, 16, 1, 64)] * 2
    with pytest.raises(RuntimeError, match="18 tensors, a K and a V cache and a window per layer expected"):
        torch.classes.lmgen.DecodeLayers([torch.ones(64)] * 17, caches, caches, [0, 0], 1, 1, 0.125, 1e-5)
    with pytest.raises(RuntimeError, match="a window per layer expected"):
        torch.classes.lmgen.DecodeLayers([torch.ones(64)] * 36, caches, caches, [0], 1, 1, 0.125, 1e-5)


def test_an_error_inside_the_one_call_surfaces_and_the_next_call_runs(llama_path, monkeypatch):
    llm = LLM(str(llama_path), dtype="float32")
    captured = []
    decode_layers = torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: captured.append(args) or decode_layers(*args),
                        raising=False)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    x, cos, sin, slots, tables, lens, layers = captured[-1]
    expected = decode_layers(*captured[-1])  # rewrites the same cache slot with the same rows
    with pytest.raises(RuntimeError, match="is not in the cache"):  # raised while the threads work as one crew
        decode_layers(x, cos, sin, torch.full_like(slots, 10**9), tables, lens, layers)
    again = decode_layers(*captured[-1])
    assert all(torch.equal(a, b) for a, b in zip(again, expected))
