"""Mixture-of-experts checkpoints beyond the shared parity tests (tests/test_model_parity.py runs every
MoE variant against transformers): loading experts by index, the memory check, the decode path."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmgen import LLM, SamplingParams, UnsupportedModelError
from lmgen.errors import InsufficientMemoryError
from lmgen.layers.quant import QuantConfig
from lmgen.loader import model as loader
from lmgen.models import model_class


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
    needed = loader.weights_bytes(cls, spec, 256, torch.float32, None)
    assert loader.weights_bytes(cls, spec, 256, torch.float32, QuantConfig("int4")) < needed / 3
    monkeypatch.setattr(loader, "free_memory", lambda device: needed - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"need {needed / 2**20:.1f} MiB but only "
                                                      rf"{(needed - 1) / 2**20:.1f} MiB of cpu memory is free"):
        LLM(str(path), dtype="float32")
    monkeypatch.setattr(loader, "free_memory", lambda device: needed)
    assert LLM(str(path), dtype="float32").generate([[1, 5]], SamplingParams(max_tokens=2))


@pytest.mark.usefixtures("cpu_kernels")
def test_moe_layers_decode_module_by_module(checkpoint_factory, monkeypatch):
    """cpu.cpp's one-call decode has no MoE step: such models run their layers as modules."""
    llm = LLM(str(checkpoint_factory("mixtral")), dtype="float32")
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: pytest.fail("called"), raising=False)
    assert llm.generate([[1, 5, 9]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
