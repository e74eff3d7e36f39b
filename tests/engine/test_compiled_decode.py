"""The compiled decode step (compile=True) against the eager reference path."""

import pytest
import torch

from lmgen import LLM, SamplingParams
from lmgen.models.transformer import TransformerForCausalLM

PROMPTS = [list(range(3 + i, 3 + i + length)) for i, length in enumerate([5, 19, 40, 7, 12, 33, 9, 26] * 2)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.fixture(autouse=True)
def layer_by_layer(monkeypatch):
    """The compiled graph serves the decode steps whose layers cannot run in one kernel call
    (no AVX2 kernels, a GPU; see tests/test_decode_layers.py for the others): make every step one of those."""
    monkeypatch.setattr(TransformerForCausalLM, "one_call_layers", lambda *_: None)


# One variant per code path the spec can take (the compiled forward is the modules'): Llama's layer,
# Gemma 2's sandwich norms, soft caps and GELU, Gemma 3's q/k norms and per-layer ropes, Phi-3's partial
# longrope, OLMo 2's post-norms, GPT-2's LayerNorm, learned positions and ungated MLP.
@pytest.mark.parametrize("variant", ["llama", "mistral-sliding", "gemma2", "gemma3", "phi3", "olmo2", "gpt2"])
def test_compiled_decode_gives_the_eager_tokens(checkpoint_factory, variant):
    torch._dynamo.reset()  # else past dynamo's recompile limit (8 models) the "compiled" step runs eagerly
    path = str(checkpoint_factory(variant))
    eager, compiled = LLM(path, dtype="float32"), LLM(path, dtype="float32", compile=True)
    for batch in (PROMPTS[:1], PROMPTS[:3], PROMPTS):  # batch sizes 1, 3 and 16, prompts of mixed lengths
        assert greedy_tokens(compiled, batch) == greedy_tokens(eager, batch)


def test_batch_sizes_and_context_lengths_reuse_one_graph(llama_path):
    torch._dynamo.reset()
    llm = LLM(str(llama_path), dtype="float32", compile=True, block_size=4)
    greedy_tokens(llm, PROMPTS[:2])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for size in (3, 5, 16):  # and the KV blocks per request grow every 4 tokens
        greedy_tokens(llm, PROMPTS[:size])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_without_a_cpp_compiler_loading_fails_with_the_fix(llama_path, monkeypatch):
    from torch._inductor import cpp_builder

    from lmgen.errors import InvalidArgumentError

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(InvalidArgumentError, match="C\\+\\+ compiler"):
        LLM(str(llama_path), compile=True, device="cpu")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_compiled_decode_of_quantized_weights_gives_the_eager_tokens(llama_path, quantization):
    eager = LLM(str(llama_path), dtype="bfloat16", quantization=quantization)
    compiled = LLM(str(llama_path), dtype="bfloat16", quantization=quantization, compile=True)
    for batch in (PROMPTS[:1], PROMPTS):
        assert greedy_tokens(compiled, batch) == greedy_tokens(eager, batch)
