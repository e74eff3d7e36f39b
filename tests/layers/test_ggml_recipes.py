"""llama.cpp's recipes quantized while loading (layers/ggml_quant.py, layers/ggml_recipes.py), against llama.cpp
itself: a tiny checkpoint written as an f32 GGUF and quantized by ``llama_model_quantize`` holds, tensor for
tensor, the types lmgen's recipe picks and the bytes lmgen's quantizers write; loading the checkpoint with
``quantization="q4_k_m"`` gives the block layers of loading llama.cpp's file."""

import gguf
import llama_cpp  # the reference: llama-cpp-python (the test extra)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint
from gguf_files import write_gguf
from lmgen import LLM, SamplingParams
from lmgen.errors import InvalidArgumentError
from lmgen.layers.ggml import GGMLLinear
from lmgen.layers.ggml_quant import Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, quantize_blocks
from lmgen.layers.ggml_recipes import recipe_types
from lmgen.loader.gguf import FAMILIES, lmgen_name

# 8 layers (llama.cpp's layer rules pick 0, 3, 6 and 7), rows of 256 (K-quants) and 320 (their fallbacks)
SHAPE = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2)
FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(checkpoint folder, its f32 GGUF): Qwen2 with the tied embedding (the LM head's rules) and biases."""
    root = tmp_path_factory.mktemp("recipes")
    folder = build_checkpoint(root / "qwen2", "qwen2", **SHAPE)
    tensors = load_file(folder / "model.safetensors")  # a zero row (all-zero blocks), a flat one (values alike)
    tensors["model.layers.0.mlp.up_proj.weight"][3] = 0
    tensors["model.layers.0.mlp.up_proj.weight"][4] = -0.25
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, write_gguf(folder, root / "f32.gguf", "qwen2")


def llama_quantize(source, out, ftype: str, pure: bool = False) -> dict[str, gguf.ReaderTensor]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = getattr(llama_cpp, ftype), 1, pure
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return {t.name: t for t in gguf.GGUFReader(out).tensors}


def matrices(tensors: dict[str, gguf.ReaderTensor]) -> dict[str, gguf.ReaderTensor]:
    return {name: t for name, t in tensors.items() if len(t.shape) == 2}


def test_recipes_pick_llama_cpps_types(qwen, tmp_path):
    folder, f32 = qwen
    llm = LLM(str(folder), kv_cache_memory="16MiB")
    for method, ftype in FTYPES.items():
        theirs = matrices(llama_quantize(f32, tmp_path / f"{method}.gguf", ftype))
        ours = recipe_types(llm.engine.model, method, lm_head=True)
        expected = {lmgen_name(name, FAMILIES["qwen2"]): t.tensor_type.value for name, t in theirs.items()}
        assert ours == expected, method


def test_fused_checkpoint_tensors_follow_llama_cpp(tmp_path):
    """Phi-3 stores q/k/v as one tensor (llama.cpp's attn_qkv, whose rules are attn_v's) and gate/up as one;
    its head is untied (the embedding takes the default type); rows of 64: every fallback."""
    folder = build_checkpoint(tmp_path / "phi3", "phi3", num_hidden_layers=8)
    theirs = matrices(llama_quantize(write_gguf(folder, tmp_path / "f32.gguf", "phi3"), tmp_path / "q.gguf",
                                     FTYPES["q4_k_m"]))
    ours = recipe_types(LLM(str(folder), kv_cache_memory="16MiB").engine.model, "q4_k_m", lm_head=True)
    assert ours == {lmgen_name(name, FAMILIES["phi3"]): t.tensor_type.value for name, t in theirs.items()}


def test_quantizers_write_llama_cpps_bytes(qwen, tmp_path):
    """Layer 0 of a Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0; its up projection with an all-zero and a flat row),
    its tied embedding, and Q5_K and its fallback Q5_1 (a pure Q5_K_M)."""
    _, f32 = qwen
    floats = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(f32).tensors}
    q4km = matrices(llama_quantize(f32, tmp_path / "q4_k_m.gguf", FTYPES["q4_k_m"]))
    q5k = matrices(llama_quantize(f32, tmp_path / "q5_k.gguf", "LLAMA_FTYPE_MOSTLY_Q5_K_M", pure=True))
    chosen = [*(t for name, t in q4km.items() if name.startswith(("blk.0.", "blk.1.", "token_embd"))),
              q5k["blk.0.attn_q.weight"], q5k["blk.0.ffn_down.weight"]]
    assert {t.tensor_type.name for t in chosen} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q5_K", "Q5_1"}
    for tensor in chosen:
        ours = quantize_blocks(floats[tensor.name], tensor.tensor_type.value)
        assert torch.equal(ours.flatten(), torch.from_numpy(np.array(tensor.data).reshape(-1))), tensor.name


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
    folder, f32 = qwen
    file = tmp_path / "q4_k_m.gguf"
    llama_quantize(f32, file, FTYPES["q4_k_m"])
    ours = LLM(str(folder), quantization="q4_k_m", kv_cache_memory="16MiB")
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
