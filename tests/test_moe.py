"""Mixture-of-experts checkpoints beyond the shared parity tests (tests/test_model_parity.py runs every
MoE variant against transformers): loading experts by index, the memory check, router statistics from the one-call decode."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmgen import LLM, SamplingParams, UnsupportedModelError
from lmgen.errors import InsufficientMemoryError
from lmgen.layers.moe import tokens_per_expert
from lmgen.layers.quant import QuantConfig
from lmgen.loader import model as loader
from lmgen.models import model_class
from lmgen.models.transformer import TransformerForCausalLM


def _edited(source, folder, config_changes=None, drop=()):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k not in drop}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_missing_expert_tensor_is_named(checkpoint_factory, tmp_path):
    folder = _edited(checkpoint_factory("qwen3-moe"), tmp_path / "partial",
                     drop=["model.layers.2.mlp.experts.5.up_proj.weight"])
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.2\.mlp\.experts\.gate_up_proj\.weight"):
        LLM(str(folder))


def test_an_expert_the_config_does_not_have_is_named(checkpoint_factory, tmp_path):
    folder = _edited(checkpoint_factory("olmoe"), tmp_path / "fewer", config_changes=dict(num_experts=6))
    with pytest.raises(UnsupportedModelError, match=r"experts\.6\.\w+_proj\.weight is of expert 6, but .* holds 6"):
        LLM(str(folder))


def test_weights_beyond_free_memory_are_refused_naming_both_sizes(checkpoint_factory, monkeypatch):
    path = checkpoint_factory("qwen3-moe")
    config = json.loads((path / "config.json").read_text())
    cls = model_class(config)
    spec = cls.spec_from_config(config)
    needed = loader.weights_bytes(loader._meta_model(cls, spec, 256, torch.float32, None))
    assert loader.weights_bytes(loader._meta_model(cls, spec, 256, torch.float32, QuantConfig("int4"))) < needed / 3
    monkeypatch.setattr(loader, "free_memory", lambda device: needed - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"need {needed / 2**20:.1f} MiB but only "
                                                      rf"{(needed - 1) / 2**20:.1f} MiB of cpu memory is free"):
        LLM(str(path), dtype="float32")
    monkeypatch.setattr(loader, "free_memory", lambda device: needed)
    assert LLM(str(path), dtype="float32").generate([[1, 5]], SamplingParams(max_tokens=2))


@pytest.mark.usefixtures("cpu_kernels")
def test_the_one_call_decode_counts_the_tokens_per_expert_as_the_modules_do(checkpoint_factory, monkeypatch):
    llm = LLM(str(checkpoint_factory("qwen2-moe")), dtype="float32", enable_prefix_caching=False)
    prompts, greedy = [[1, 5, 9], list(range(3, 30))], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    def counts() -> list[list[int]]:
        stats = tokens_per_expert(llm.engine.model)
        result = [t.tolist() for t in stats.values()]
        for t in stats.values():
            t.zero_()
        return result

    llm.generate(prompts, greedy)
    one_call = counts()
    assert [sum(c) for c in one_call] == [(3 + 27 + 2 * 5) * 2] * 2  # every token computed, top 2, both layers
    monkeypatch.setattr(TransformerForCausalLM, "one_call_layers", lambda *_: None)
    llm.generate(prompts, greedy)
    assert counts() == one_call
