"""Quantized checkpoints: `lmgen quantize`, loading them back, and `lmgen perplexity`."""

import io
import json
import os
import re
import stat
import sys

import pytest
import torch
from safetensors import safe_open

from lmgen import LLM, InvalidArgumentError, SamplingParams, quantize_checkpoint
from lmgen.cli import main


@pytest.fixture(scope="module")
def int4_path(llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "llama-int4"
    assert main(["quantize", "--model", str(llama_path), "--method", "int4", "--group-size", "32",
                 "--out", str(out)]) == 0
    return out


def test_quantize_writes_a_complete_model(llama_path, int4_path):
    config = json.loads((int4_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "lmgen", "format_version": 1, "method": "int4",
                                             "group_size": 32, "lm_head": True}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (int4_path / name).read_bytes() == (llama_path / name).read_bytes()
    with safe_open(int4_path / "model.safetensors", "pt") as f:
        layer = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{layer}.weight").dtype == torch.uint8  # two int4 columns per byte
        assert f.get_tensor(f"{layer}.weight").shape == (64, 64) and f.get_tensor(f"{layer}.scales").shape == (64, 4)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.int8  # the tied head: int8 rows
        assert f.get_tensor("model.norm.weight").dtype == torch.float32


@pytest.mark.parametrize("variant,method", [("llama", "int4"), ("llama-untied-bias-headdim", "int8"),
                                            ("qwen2", "int4")])
def test_saved_checkpoint_loads_to_the_same_model(checkpoint_factory, tmp_path, variant, method):
    path = checkpoint_factory(variant)
    quantize_checkpoint(path, tmp_path / "q", method, group_size=32)
    in_memory = LLM(str(path), quantization=method, quantization_group_size=32)
    loaded = LLM(str(tmp_path / "q"))
    assert loaded.engine.quantization == in_memory.engine.quantization
    prompt = in_memory.tokenizer.encode("Once upon a time there was")
    assert torch.equal(in_memory.engine.score([prompt])[0], loaded.engine.score([prompt])[0])
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert in_memory.generate([prompt], params)[0].outputs[0].token_ids == \
        loaded.generate([prompt], params)[0].outputs[0].token_ids


def test_a_quantized_checkpoint_can_only_be_loaded_as_it_is(int4_path):
    assert LLM(str(int4_path), quantization="int4").engine.quantization.group_size == 32  # repeating it is fine
    with pytest.raises(InvalidArgumentError, match="already quantized.*cannot be requantized"):
        LLM(str(int4_path), quantization="int8")
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        quantize_checkpoint(int4_path, int4_path.parent / "twice")


def test_quantized_weights_get_the_umask_s_mode_like_the_other_files(int4_path):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((int4_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert (int4_path / "model.safetensors").stat().st_mode == (int4_path / "config.json").stat().st_mode


def test_quantizing_shows_a_progress_bar_on_a_terminal(llama_path, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    quantize_checkpoint(llama_path, tmp_path / "q", "int8")
    assert re.search(r"quantizing: +0%\|.*\| 0/\d+ .* tensor/s\]", sys.stderr.getvalue())


def test_quantize_refuses_a_folder_that_is_not_empty(llama_path, tmp_path, capsys):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert main(["quantize", "--model", str(llama_path), "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_quantize_names_the_layer_a_group_size_does_not_divide(checkpoint_factory, tmp_path, capsys):
    path = checkpoint_factory("llama-untied-bias-headdim")
    assert main(["quantize", "--model", str(path), "--group-size", "64", "--out", str(tmp_path / "q")]) == 2
    assert "does not divide the 96 input features of model.layers.0.self_attn.o_proj" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_perplexity_command(llama_path, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["perplexity", "--model", str(llama_path), "--file", str(text), "--context", "64",
                 "--stride", "32", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "windows of 64 tokens, stride 32" in out


def test_perplexity_command_reports_the_window_a_short_text_fills(llama_path, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["perplexity", "--model", str(llama_path), "--file", str(text)]) == 0  # default context: 255
    scored, window = map(int, re.search(r"over (\d+) scored tokens; 1 window of (\d+) tokens\)$",
                                        capsys.readouterr().out.strip()).groups())
    assert window == scored + 1 < 255


def test_perplexity_stride_beyond_the_context_names_the_flags(llama_path, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox")
    assert main(["perplexity", "--model", "./not-loaded", "--file", str(text), "--context", "8",
                 "--stride", "9"]) == 2
    assert "--stride (9) must be at most --context (8)" in capsys.readouterr().err


def test_perplexity_command_reports_a_missing_file(llama_path, tmp_path, capsys):
    assert main(["perplexity", "--model", str(llama_path), "--file", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read --file" in capsys.readouterr().err
