"""llama.cpp's recipes quantized while loading (layers/ggml_quant.py, layers/ggml_recipes.py), against llama.cpp
itself: its ``llama_model_quantize``'s type for every matrix of tiny checkpoints and its blocks for a tensor of
each type, recorded by data/record_llama_cpp_quants.py (llama-cpp-python builds llama.cpp from source: too
long for every test run), equal lmgen's recipe's types and quantizers' bytes; loading a checkpoint with
``quantization="q4_k_m"`` gives the block layers of loading the GGUF file of llama.cpp's types."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoints import build_checkpoint, recipe_qwen2_checkpoint
from gguf_files import write_gguf
from lmgen import LLM, SamplingParams
from lmgen.errors import InvalidArgumentError
from lmgen.layers.ggml import GGMLLinear
from lmgen.layers.ggml_quant import Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, quantize_blocks
from lmgen.layers.ggml_recipes import recipe_types
from lmgen.loader.gguf import FAMILIES, lmgen_name

DATA = Path(__file__).resolve().parents[1] / "data"
LLAMA_TYPES = json.loads((DATA / "llama_cpp_quants.json").read_text())


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return recipe_qwen2_checkpoint(tmp_path_factory.mktemp("recipes"))


def test_recipes_pick_llama_cpps_types(qwen):
    llm = LLM(str(qwen), kv_cache_memory="16MiB")
    for method, theirs in LLAMA_TYPES["qwen2"].items():
        ours = recipe_types(llm.engine.model, method, lm_head=True)
        assert ours == {lmgen_name(name, FAMILIES["qwen2"]): kind for name, kind in theirs.items()}, method


def test_fused_checkpoint_tensors_follow_llama_cpp(tmp_path):
    """Phi-3 stores q/k/v as one tensor (llama.cpp's attn_qkv, whose rules are attn_v's) and gate/up as one;
    its head is untied (the embedding takes the default type); rows of 64: every fallback."""
    folder = build_checkpoint(tmp_path / "phi3", "phi3", num_hidden_layers=8)
    ours = recipe_types(LLM(str(folder), kv_cache_memory="16MiB").engine.model, "q4_k_m", lm_head=True)
    assert ours == {lmgen_name(name, FAMILIES["phi3"]): kind for name, kind in LLAMA_TYPES["phi3"]["q4_k_m"].items()}


def test_quantizers_write_llama_cpps_bytes():
    """Layers 0 and 1 of a Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0; its up projection with an all-zero and a flat row),
    its tied embedding, and Q5_K and its fallback Q5_1 (a pure Q5_K_M)."""
    recorded = np.load(DATA / "llama_cpp_quants.npz")
    keys = sorted({key.rsplit(":", 1)[0] for key in recorded.files})
    assert {key.split(":")[1] for key in keys} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q5_K", "Q5_1"}
    for key in keys:
        ours = quantize_blocks(torch.from_numpy(recorded[key + ":floats"]), gguf.GGMLQuantizationType[key.split(":")[1]])
        assert torch.equal(ours.flatten(), torch.from_numpy(recorded[key + ":blocks"]).flatten()), key


@pytest.mark.parametrize("ggml_type", [Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0])
def test_round_trip_is_gguf_dequantize(ggml_type):
    """Blocks dequantized by the gguf package come close to the weights (each type's own error bound)."""
    weight = torch.randn(4, 512) * torch.linspace(0.01, 2, 4)[:, None]
    blocks = quantize_blocks(weight, ggml_type)
    values = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(ggml_type)))
    step = weight.abs().amax(1, keepdim=True)
    assert (values - weight).abs().max() < 0.1 * step.max()


@pytest.mark.usefixtures("cpu_kernels")
def test_q4_k_m_loads_as_llama_cpps_file(qwen, tmp_path):
    """The GGUF file of llama.cpp's types and blocks (its quantizers' bytes are lmgen's: above)."""
    types = LLAMA_TYPES["qwen2"]["q4_k_m"]

    def blocks(name: str, array: np.ndarray) -> np.ndarray:
        return quantize_blocks(torch.from_numpy(array), types[name]).numpy()

    file = write_gguf(qwen, tmp_path / "q4_k_m.gguf", "qwen2", lambda name, array: gguf.GGMLQuantizationType(types[name]),
                      encode=blocks)
    ours = LLM(str(qwen), quantization="q4_k_m", kv_cache_memory="16MiB")
    theirs = LLM(str(file), kv_cache_memory="16MiB")
    mine = {n: m for n, m in ours.engine.model.named_modules() if isinstance(m, GGMLLinear)}
    file_layers = {n: m for n, m in theirs.engine.model.named_modules() if isinstance(m, GGMLLinear)}
    assert mine.keys() == file_layers.keys() and len(mine) == 8 * 4 + 1  # qkv, o, gate/up, down; the tied embedding
    for name, layer in mine.items():
        assert layer.types == file_layers[name].types and torch.equal(layer.weight, file_layers[name].weight), name
    params = SamplingParams(max_tokens=8, temperature=0)
    assert ours.generate(["The quick brown"], params)[0].outputs[0].token_ids == \
        theirs.generate(["The quick brown"], params)[0].outputs[0].token_ids


def test_without_block_kernels_the_values_are_dequantized(llama_path, monkeypatch):
    """Where the block kernels do not run, the same quantized values load as floats."""
    from lmgen import kernels
    monkeypatch.setattr(kernels, "load", lambda: False)
    llm = LLM(str(llama_path), quantization="q4_k_m", kv_cache_memory="16MiB")
    assert not any(isinstance(m, GGMLLinear) for m in llm.engine.model.modules())
    weight = llm.engine.model.model.layers[0].mlp.down_proj.weight
    float_weight = load_file(llama_path / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    blocks = quantize_blocks(float_weight, Q5_0)  # layer 0 of 2: Q4_K, on 128 columns Q5_0
    expected = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q5_0)
    assert torch.equal(weight, torch.from_numpy(expected).to(weight.dtype))


def test_recipes_refuse_what_they_cannot_do(checkpoint_factory, tmp_path):
    with pytest.raises(InvalidArgumentError, match="dense models"):
        LLM(str(checkpoint_factory("mixtral")), quantization="q4_k_m", kv_cache_memory="16MiB")
    from lmgen.quantize import quantize_checkpoint
    with pytest.raises(InvalidArgumentError, match="applied while loading"):
        quantize_checkpoint(checkpoint_factory("llama"), tmp_path / "out", method="q4_k_m")


def test_cli_and_drop_in_take_the_recipes(llama_path, capsys):
    from lmgen.cli import main
    from lmgen.layers.quant import QuantConfig
    from lmgen.quantization_config import quantization_engine_args

    assert main(["generate", "Lisbon", "--model", str(llama_path), "--quantize", "q4_k_m", "-n", "2", "-t", "0"]) == 0
    assert quantization_engine_args(quantization_config=QuantConfig("q4_k_m"))["quantization"] == "q4_k_m"
    with pytest.raises(SystemExit):  # lmgen quantize writes int8/int4 only
        main(["quantize", "--model", str(llama_path), "--method", "q4_k_m", "--out", "x"])
    assert "invalid choice: 'q4_k_m'" in capsys.readouterr().err
