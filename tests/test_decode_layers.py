"""A decode step's layers in one kernel call (torch.ops.lmgen.decode_layers) against the
layer-by-layer modules: the same kernels in the same order, so the same bits."""

import pytest
import torch

from lmgen import LLM, SamplingParams
from lmgen.models.transformer import TransformerForCausalLM

pytestmark = pytest.mark.usefixtures("cpu_kernels")

PROMPTS = [list(range(3 + i, 3 + i + length)) for i, length in enumerate([5, 19, 40])]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)


def _tokens_and_logprobs(llm: LLM) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("variant, dtype, quantization", [
    ("llama", "float32", None), ("llama", "bfloat16", None), ("mistral-sliding", "bfloat16", None),
    ("qwen2", "float32", None),  # q/k/v biases
    ("llama", "bfloat16", "int8"), ("llama", "bfloat16", "int4"),
    # every family's layer: q/k norms, sandwich norms and soft caps, per-layer ropes, partial rotary,
    # post-norms, multipliers, NoPE layers, LayerNorm and an ungated GELU MLP
    ("qwen3", "bfloat16", None), ("gemma2", "bfloat16", None), ("gemma3", "float32", None), ("phi3", "bfloat16", None),
    ("olmo2", "bfloat16", None), ("granite", "bfloat16", None), ("smollm3", "float32", None),
    ("gpt2", "bfloat16", None), ("gemma3", "bfloat16", "int4"),
    # mixtures of experts: float32 routing weights, a gated shared expert, dense and MoE layers, int8/int4 experts
    ("mixtral", "bfloat16", None), ("qwen2-moe", "bfloat16", None), ("qwen3-moe", "bfloat16", "int4"),
    ("olmoe", "float32", "int8"),
    # sinks, biased router and experts, the clamped SwiGLU
    ("gpt-oss", "bfloat16", None), ("gpt-oss", "float32", "int4"),
])
def test_one_call_for_all_layers_gives_the_modules_bits(checkpoint_factory, monkeypatch, variant, dtype, quantization):
    # no prefix cache: the second run must prefill as the first did (a cached prefix leaves a chunk short
    # enough for the decode kernel instead of SDPA)
    llm = LLM(str(checkpoint_factory(variant)), dtype=dtype, quantization=quantization, enable_prefix_caching=False)
    _assert_one_call_gives_the_modules_bits(llm, monkeypatch)


@pytest.mark.parametrize("variant, dtype, kv_cache_dtype", [
    ("llama", "float32", "float16"), ("qwen2", "float32", "bfloat16"),
    ("phi3", "bfloat16", "float32"),  # partial rotary: the keys' unrotated part converted too; a wider cache
    ("mistral-sliding", "bfloat16", "float16"),  # bfloat16 into float16: through float32, as PyTorch converts
])
def test_one_call_writes_a_cache_of_another_dtype_as_the_modules_do(checkpoint_factory, monkeypatch, variant, dtype,
                                                                     kv_cache_dtype):
    """The kernel's conversion into the cache against index_copy_ of keys and values cast by PyTorch: the same
    bits, for 3 requests of 5, 19 and 40 prompt tokens over 2 KV heads of 16 dimensions."""
    llm = LLM(str(checkpoint_factory(variant)), dtype=dtype, kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=False)
    assert llm.engine.kv_cache.layers[0][0].dtype == getattr(torch, kv_cache_dtype)
    _assert_one_call_gives_the_modules_bits(llm, monkeypatch)


def _assert_one_call_gives_the_modules_bits(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    decode_layers = torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: calls.append(1) or decode_layers(*args),
                        raising=False)
    one_call = _tokens_and_logprobs(llm)
    assert len(calls) == 9, len(calls)  # every decode step: 10 tokens, the first from the prefill
    monkeypatch.setattr(TransformerForCausalLM, "one_call_layers", lambda *_: None)
    assert _tokens_and_logprobs(llm) == one_call


@pytest.mark.parametrize("dtype, quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int8"),
                                                 ("bfloat16", "int4")])
def test_one_call_for_a_batch_of_70_decoding_in_tiles_gives_the_modules_bits(llama_path, monkeypatch, dtype,
                                                                            quantization):
    """70 rows: the products' tiles (from 64 rows in float32), in the one call and module by module."""
    llm = LLM(str(llama_path), dtype=dtype, quantization=quantization, max_num_seqs=70, enable_prefix_caching=False)
    prompts = [list(range(3 + i, 9 + i)) for i in range(70)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    rows = []
    decode_layers = torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers",
                        lambda x, *args: rows.append(x.shape[0]) or decode_layers(x, *args), raising=False)
    one_call = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]
    assert rows == [420, 70, 70]  # the 6-token prompts (short enough for the decode attention), then 2 decode steps
    monkeypatch.setattr(TransformerForCausalLM, "one_call_layers", lambda *_: None)
    assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)] == one_call


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


SETTINGS = dict(num_heads=1.0, num_kv_heads=1.0, norm_kind=0.0, norm_eps=1e-5, norm_offset=0.0, qk_norm=0.0,
                activation=0.0, gated=1.0, scale=0.125, softcap=0.0, residual_scale=1.0)


def test_decode_layers_handle_names_what_is_missing_or_unknown():
    with pytest.raises(RuntimeError, match="the settings lacks norm_kind"):
        torch.classes.lmgen.DecodeLayers({k: v for k, v in SETTINGS.items() if k != "norm_kind"})
    with pytest.raises(RuntimeError, match="the settings has unknown entries: rope_scale"):
        torch.classes.lmgen.DecodeLayers({**SETTINGS, "rope_scale": 1.0})
    handle = torch.classes.lmgen.DecodeLayers(SETTINGS)
    cache, weight = torch.zeros(4, 16, 1, 64), torch.ones(64, 64)
    layer = {"qkv.weight": torch.ones(192, 64), "o.weight": weight, "up.weight": torch.ones(128, 64),
             "down.weight": torch.ones(64, 64), "k_cache": cache, "v_cache": cache}
    with pytest.raises(RuntimeError, match="layer 0 lacks down.weight"):
        handle.add_layer({k: v for k, v in layer.items() if k != "down.weight"}, 0, 0)
    with pytest.raises(RuntimeError, match="layer 0 has unknown entries: q_nrom.weight"):  # a typo is no silent skip
        handle.add_layer({**layer, "q_nrom.weight": torch.ones(64)}, 0, 0)
    with pytest.raises(RuntimeError, match="q_norm and k_norm go together with the qk_norm setting"):
        handle.add_layer({**layer, "q_norm.weight": torch.ones(64), "k_norm.weight": torch.ones(64)}, 0, 0)
    experts = {"router.weight": torch.ones(4, 64), "experts_up.weight": torch.ones(4, 64, 64),
               "experts_down.weight": torch.ones(4, 64, 32), "moe_counts": torch.zeros(4, dtype=torch.int64)}
    moe_layer = {**{k: v for k, v in layer.items() if k not in ("up.weight", "down.weight")}, **experts}
    with pytest.raises(RuntimeError, match="a MoE layer needs the moe_top_k setting"):
        handle.add_layer(moe_layer, 0, 0)
    with pytest.raises(RuntimeError, match="shared_up, shared_down and shared_gate go together"):
        torch.classes.lmgen.DecodeLayers({**SETTINGS, "moe_top_k": 2.0}).add_layer(
            {**moe_layer, "shared_up.weight": torch.ones(64, 64)}, 0, 0)
    with pytest.raises(RuntimeError, match="the settings lacks swiglu_alpha"):  # the clamped SwiGLU's
        torch.classes.lmgen.DecodeLayers({**SETTINGS, "activation": 2.0})
    handle.add_layer(layer, 0, 0)


def test_an_error_inside_the_one_call_surfaces_and_the_next_call_runs(llama_path, monkeypatch):
    llm = LLM(str(llama_path), dtype="float32")
    captured = []
    decode_layers = torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: captured.append(args) or decode_layers(*args),
                        raising=False)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    x, rotary, slots, tables, lens, layers = captured[-1]
    expected = decode_layers(*captured[-1])  # rewrites the same cache slot with the same rows
    with pytest.raises(RuntimeError, match="is not in the cache"):  # raised while the threads work as one crew
        decode_layers(x, rotary, torch.full_like(slots, 10**9), tables, lens, layers)
    again = decode_layers(*captured[-1])
    assert all(torch.equal(a, b) for a, b in zip(again, expected))
