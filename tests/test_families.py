"""What each family brings beyond the shared parity tests (tests/test_model_parity.py), and the
model contract: refused config keys, strict loading, a spec that cannot be built."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmgen import LLM, SamplingParams, UnsupportedModelError
from lmgen.layers.linear import Activation
from lmgen.layers.rotary import RopeConfig
from lmgen.models.contract import LayerSpec, ModelSpec, check_contract

from test_model_parity import hf_greedy


def _edited_config(source, folder, **changes):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("chunk", [512, 8])
def test_phi3_longrope_past_its_original_length_matches_transformers(checkpoint_factory, chunk):
    """Original length 16: prompts that start past it, and prompts whose output crosses it, which
    transformers answers by computing the whole sequence again with the long factors (as lmgen does)."""
    path = checkpoint_factory("phi3-long")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=chunk, block_size=4)
    prompts = [list(range(3, 23)), list(range(40, 77)), [1, *range(100, 110)], [1, 5, 9]]
    for prompt, logits in zip(prompts, llm.engine.score(prompts)):
        with torch.no_grad():
            assert (logits - hf(torch.tensor([prompt])).logits[0]).abs().max().item() <= 1e-4
    greedy = SamplingParams(max_tokens=20, temperature=0)
    expected = [hf_greedy(hf, p)[:20] for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == expected
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == expected  # with cached prefixes


@pytest.mark.parametrize("variant, changes, key", [
    ("llama", dict(rope_parameters=dict(rope_type="mrope", rope_theta=1e4)), "mrope"),
    ("llama", dict(hidden_act="relu"), "relu"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_a_config_key_lmgen_does_not_implement_is_named(checkpoint_factory, tmp_path, variant, changes, key):
    folder = _edited_config(checkpoint_factory(variant), tmp_path / "edited", **changes)
    with pytest.raises(UnsupportedModelError, match=key):
        LLM(str(folder))


def test_a_checkpoint_tensor_no_parameter_takes_is_an_error_naming_it(checkpoint_factory, tmp_path):
    """A Qwen3 checkpoint read as Qwen2 has q/k norms the model would silently drop."""
    folder = _edited_config(checkpoint_factory("qwen3"), tmp_path / "as-qwen2", architectures=["Qwen2ForCausalLM"],
                            attention_bias=False)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.[qk]_norm\.weight has no parameter"):
        LLM(str(folder))


def test_gpt2_checkpoints_without_the_transformer_prefix_load(checkpoint_factory, tmp_path):
    """The Hub's original GPT-2 files name tensors h.0..., wte, wpe, ln_f (and keep the attention mask)."""
    source = checkpoint_factory("gpt2")
    folder = tmp_path / "old-gpt2"
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    weights = {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}
    weights["h.0.attn.bias"] = torch.ones(1, 1, 256, 256)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    prompt, greedy = [1, 5, 9, 200], SamplingParams(max_tokens=8, temperature=0)
    expected = LLM(str(source), dtype="float32").generate([prompt], greedy)[0].outputs[0].token_ids
    assert LLM(str(folder), dtype="float32").generate([prompt], greedy)[0].outputs[0].token_ids == expected


def test_a_spec_that_does_not_hold_together_names_the_fault():
    rope = RopeConfig(head_dim=16)
    fields = dict(vocab_size=10, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                  ropes=(rope,), max_position_embeddings=64)
    with pytest.raises(UnsupportedModelError, match="layer 1 uses rope 1, but there are 1"):
        ModelSpec(**fields, layers=(LayerSpec(), LayerSpec(rope=1)))
    with pytest.raises(UnsupportedModelError, match="3 attention heads cannot share 2"):
        ModelSpec(**{**fields, "num_heads": 3}, layers=(LayerSpec(),))
    with pytest.raises(UnsupportedModelError, match="unknown norm places"):
        ModelSpec(**fields, layers=(LayerSpec(),), norm_places=frozenset({"input", "after_everything"}))
    with pytest.raises(UnsupportedModelError, match="swiglu_clamp goes with the clamped SwiGLU"):
        ModelSpec(**fields, layers=(LayerSpec(),), activation=Activation.CLAMPED_SWIGLU)


def test_a_model_missing_a_piece_of_the_contract_is_named():
    class Forgetful(torch.nn.Module):
        packed_modules: dict = {}

        def forward(self, *_):
            return None

    with pytest.raises(UnsupportedModelError, match="lacks spec, compute_logits, one_call_layers, checkpoint_tensors"):
        check_contract(Forgetful())


FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite", "smollm3", "gpt2", "qwen2-moe", "qwen3-moe",
            "gpt-oss"]
FEATURE_PROMPTS = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((5, 19, 40))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("variant", FAMILIES)
def test_prefix_caching_preemption_and_seeds_on_every_family(checkpoint_factory, variant):
    path = str(checkpoint_factory(variant))
    llm = LLM(path, dtype="float32", block_size=4)
    expected = _tokens(llm.generate(FEATURE_PROMPTS, GREEDY))
    hits = llm.engine.scheduler.num_prefix_hit_tokens
    assert _tokens(llm.generate(FEATURE_PROMPTS, GREEDY)) == expected  # the same prompts again, from the cache
    assert llm.engine.scheduler.num_prefix_hit_tokens > hits
    spec = llm.engine.model.spec
    block_bytes = spec.num_layers * 2 * 4 * spec.num_kv_heads * spec.head_dim * 4
    # 18 blocks: the three prompts fit (2 + 5 + 10 blocks), their outputs (26 blocks in all) do not
    small = LLM(path, dtype="float32", block_size=4, kv_cache_memory=18 * block_bytes)
    assert _tokens(small.generate(FEATURE_PROMPTS, GREEDY)) == expected
    assert small.engine.scheduler.num_preemptions > 0
    seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    alone = _tokens(llm.generate(FEATURE_PROMPTS[1:2], seeded))
    assert _tokens(llm.generate(FEATURE_PROMPTS, seeded))[1] == alone[0]  # the same tokens inside a batch


@pytest.mark.parametrize("variant", FAMILIES)
def test_quantized_and_structured_output_on_every_family(checkpoint_factory, tmp_path, variant):
    from lmgen import quantize_checkpoint

    path = checkpoint_factory(variant)
    saved = quantize_checkpoint(path, tmp_path / "int4", method="int4")  # lmgen's names, GPT-2's weights turned
    on_the_fly = LLM(str(path), dtype="bfloat16", quantization="int4")
    assert _tokens(LLM(str(saved), dtype="bfloat16").generate(FEATURE_PROMPTS, GREEDY)) == \
        _tokens(on_the_fly.generate(FEATURE_PROMPTS, GREEDY))
    int8 = LLM(str(path), dtype="float32", quantization="int8")
    regex = SamplingParams(max_tokens=20, temperature=0.8, seed=1, structured={"regex": r"[0-9]{3}-[0-9]{4}"})
    for output in int8.generate(["Call me at", "Number:"], regex):
        assert __import__("re").fullmatch(r"[0-9]{3}-[0-9]{4}", output.outputs[0].text)


@pytest.mark.parametrize("variant", FAMILIES)
def test_beam_search_on_every_family_matches_transformers(checkpoint_factory, variant):
    import lmgen

    path = checkpoint_factory(variant)
    ours = lmgen.AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", device_map="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = torch.tensor([[1, 50, 60, 70, 80, 90], [0, 0, 0, 1, 33, 44]])
    kwargs = dict(attention_mask=(input_ids != 0).long(), num_beams=3, num_return_sequences=2, max_new_tokens=8,
                  pad_token_id=0, do_sample=False)
    assert torch.equal(ours.generate(input_ids, **kwargs), theirs.generate(input_ids, **kwargs))
