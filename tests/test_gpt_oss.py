"""GPT-OSS beyond the shared parity tests (tests/test_model_parity.py runs the tiny gpt-oss variant against
transformers): experts stored in MXFP4, YaRN's frequencies."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoints import mxfp4_copy
from lmgen import LLM, SamplingParams, UnsupportedModelError
from lmgen.layers.rotary import RopeConfig, _yarn

from test_model_parity import NEW_TOKENS, PROMPTS, hf_greedy


@pytest.fixture(scope="module")
def mxfp4_path(checkpoint_factory, tmp_path_factory):
    return mxfp4_copy(checkpoint_factory("gpt-oss"), tmp_path_factory.mktemp("gpt-oss") / "mxfp4")


def test_mxfp4_experts_load_as_transformers_dequantizes_them(mxfp4_path, checkpoint_factory):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    llm = LLM(str(mxfp4_path), dtype="float32")
    float_model = LLM(str(checkpoint_factory("gpt-oss")), dtype="float32")
    for prompt, logits, float_logits in zip(PROMPTS, llm.engine.score(PROMPTS), float_model.engine.score(PROMPTS)):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0]
        assert (logits - expected).abs().max().item() <= 1e-4
        assert (logits - float_logits).abs().max().item() > 1e-3  # the 4-bit experts are not the float ones
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)] == [hf_greedy(hf, p) for p in PROMPTS]


def test_mxfp4_blocks_without_their_scales_are_named(mxfp4_path, tmp_path):
    folder = shutil.copytree(mxfp4_path, tmp_path / "no-scales")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        LLM(str(folder))


@pytest.mark.parametrize("parameters", [
    dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096),  # GPT-OSS
    dict(factor=4.0, original_max_position_embeddings=32768),  # Qwen3's long context: truncated correction range
    dict(factor=8.0, mscale=1.0, mscale_all_dim=0.5, original_max_position_embeddings=4096),
    dict(factor=2.0, attention_factor=1.5, original_max_position_embeddings=1024),
])
def test_yarn_frequencies_and_scaling_are_transformers(parameters):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_parameters = {"rope_type": "yarn", "rope_theta": 150000.0, **parameters}
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, head_dim=64,
                                      max_position_embeddings=131072, rope_parameters=rope_parameters)
    expected_inv_freq, expected_scaling = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv_freq, scaling = _yarn(RopeConfig.from_hf(json.loads(config.to_json_string()), 64))
    assert torch.equal(inv_freq, expected_inv_freq)
    assert scaling == expected_scaling


def test_a_config_without_optional_keys_reads_as_transformers_defaults_them():
    from lmgen.models.gpt_oss import GptOssForCausalLM

    minimal = dict(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4)
    reference = json.loads(transformers.GptOssConfig(**minimal).to_json_string())
    assert GptOssForCausalLM.spec_from_config(minimal) == GptOssForCausalLM.spec_from_config(reference)
