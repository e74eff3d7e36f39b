"""Weight-only quantization: round trips, kernels vs dequantized math, loading, errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmgen import LLM, InvalidArgumentError, QuantConfig, SamplingParams, UnsupportedModelError, kernels
from lmgen.layers.linear import Embedding, Linear
from lmgen.layers.quant import (Int4Linear, Int8Embedding, Int8Linear, dequantize_int4, quantize_int4, quantize_int8,
                                quantize_model, quantize_weight, unpack_int4)


def _rows_of_different_ranges(rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, cols) * torch.linspace(0.01, 3, rows)[:, None]


def test_int8_round_trip_error_is_within_half_a_step_per_row():
    weight = _rows_of_different_ranges(64, 48)
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    error = (q.float() * scale.float()[:, None] - weight).abs()
    assert bool((error <= scale.float()[:, None] * 0.51).all())  # half a step, plus the bfloat16 scale's rounding


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_error_is_within_half_a_step_per_group(group_size):
    weight = _rows_of_different_ranges(32, 256)
    nibbles, scales, zeros = quantize_int4(weight, group_size)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (32, 128)
    assert scales.shape == zeros.shape == (32, 256 // group_size)
    error = (dequantize_int4(nibbles, scales, zeros) - weight).abs().view(32, -1, group_size)
    step = scales.float()[..., None]
    assert bool((error <= step * 0.55).all())  # half a step, plus the bfloat16 scale and zero's rounding


def test_int4_nibbles_hold_two_columns_per_byte_low_first():
    nibbles, _, _ = quantize_int4(torch.arange(64.0).repeat(16, 1), 32)  # levels 0..15 twice per group of 32
    levels = unpack_int4(nibbles)
    assert levels[0, :4].tolist() == [0, 0, 1, 1]
    assert nibbles[0, 1] == levels[0, 2] | (levels[0, 3] << 4)


def _quantized_linear(in_features: int, out_features: int, config: QuantConfig, device: str = "cpu",
                      ) -> tuple[nn.Module, torch.Tensor]:
    """A quantized linear with a bias, and the float32 weight its storage form stands for."""
    torch.manual_seed(1)
    container = nn.ModuleDict({"proj": Linear(in_features, out_features, bias=True)})
    container.proj.weight.data.normal_()
    container.proj.bias.data.normal_()
    storage = quantize_weight(container.proj.weight.data, config.method, config.group_size)
    if config.method == "int4":
        dequantized = dequantize_int4(storage["weight"], storage["scales"], storage["zeros"])
    else:
        dequantized = storage["weight"].float() * storage["scales"].float()[:, None]
    quantize_model(container.to(device), config)
    return container.proj, dequantized.to(device)


KERNELS = ["lmgen", "pytorch", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="PyTorch's CUDA kernels need a GPU (the CPU ones are tested here)"))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64)],
                         ids=["int8", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("rows", [1, 3, 17, 100])  # 100: past the streaming kernels, in register tiles
def test_quantized_linear_equals_the_dequantized_float_linear(config, rows, kernel, monkeypatch):
    monkeypatch.setattr(kernels, "loaded", kernels.loaded and kernel == "lmgen")
    device = "cuda" if kernel == "cuda" else "cpu"
    layer, dequantized = _quantized_linear(128, 48, config, device)
    assert isinstance(layer, Int4Linear if config.method == "int4" else Int8Linear)
    assert layer.lmgen_layout == (kernels.loaded or config.method == "int8")
    # PyTorch's kernel: int8's on a CPU (on a GPU it is slower than dequantizing), int4's where lmgen's does not run
    assert layer.use_kernel == (device == "cpu" if config.method == "int8" else not kernels.loaded)
    x = torch.randn(rows, 128, device=device)
    expected = F.linear(x, dequantized, layer.bias)
    # activations pass through bfloat16 in PyTorch's kernels and int8 per group in lmgen's int4 kernel
    # (up to ~0.8% of the output): compare at that precision
    assert (layer(x) - expected).norm() < 0.015 * expected.norm()


def test_int4_layer_the_kernel_cannot_take_dequantizes_instead(monkeypatch):
    monkeypatch.setattr(kernels, "loaded", False)  # PyTorch's kernel: it takes multiples of 16 rows
    layer, dequantized = _quantized_linear(64, 40, QuantConfig("int4", 32))  # 40 rows: not a multiple of 16
    assert not layer.use_kernel
    x = torch.randn(2, 64)
    assert torch.allclose(layer(x), F.linear(x, dequantized, layer.bias), atol=1e-4)


@pytest.mark.usefixtures("cpu_kernels")
def test_int4_layer_whose_width_is_not_units_of_64_runs_on_lmgen_kernel():
    layer, dequantized = _quantized_linear(96, 48, QuantConfig("int4", 32))  # 3 groups of 32 columns
    assert layer.lmgen_layout
    x = torch.randn(3, 96)
    expected = F.linear(x, dequantized, layer.bias)
    assert (layer(x) - expected).norm() < 0.015 * expected.norm()


def test_int8_embedding_gathers_rows_and_unembeds_as_the_tied_head():
    torch.manual_seed(2)
    container = nn.ModuleDict({"embed_tokens": Embedding(100, 32)})
    table = container.embed_tokens.weight.data.normal_().clone()
    quantize_model(container, QuantConfig("int4"))
    embedding = container.embed_tokens
    assert isinstance(embedding, Int8Embedding)
    ids = torch.tensor([3, 0, 99])
    assert torch.allclose(embedding(ids), table[ids], atol=0.02)
    hidden = torch.randn(2, 32)
    assert torch.allclose(embedding.unembed(hidden), hidden @ table.T, rtol=2e-2, atol=0.15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_embedding_rows_are_the_dequantized_rows_rounded_once(dtype):
    torch.manual_seed(3)
    container = nn.ModuleDict({"embed_tokens": Embedding(100, 32)}).to(dtype)
    container.embed_tokens.weight.data.normal_()
    quantize_model(container, QuantConfig("int8"))
    embedding, ids = container.embed_tokens, torch.tensor([7, 7, 42])
    rows = embedding(ids)
    assert rows.dtype == dtype
    assert torch.equal(rows, (embedding.weight[ids].float() * embedding.scales[ids, None].float()).to(dtype))


def _logits(llm: LLM, text: str = "The quick brown fox jumps over the lazy dog") -> torch.Tensor:
    return llm.engine.score([llm.tokenizer.encode(text)])[0]


@pytest.mark.parametrize("method,min_cosine", [("int8", 0.999), ("int4", 0.9)])
@pytest.mark.parametrize("variant", ["llama", "llama-untied-bias-headdim"])  # tied and untied LM head
def test_quantized_model_stays_close_to_float_and_generates(checkpoint_factory, variant, method, min_cosine):
    path = str(checkpoint_factory(variant))
    reference = _logits(LLM(path, dtype="float32"))
    llm = LLM(path, dtype="float32", quantization=method, quantization_group_size=32)
    # no full-precision matrix is left: linears, the LM head and the embedding are integers
    matrices = [name for name, p in llm.engine.model.named_parameters()
                if p.is_floating_point() and p.dim() > 1 and not name.endswith(("scales", "zeros"))]
    assert matrices == []
    cosine = F.cosine_similarity(reference, _logits(llm), dim=-1)
    assert float(cosine.min()) > min_cosine
    [out] = llm.generate(["The quick"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 8


def test_lm_head_and_embedding_can_stay_in_full_precision(checkpoint_factory):
    path = str(checkpoint_factory("llama-untied-bias-headdim"))
    model = LLM(path, dtype="float32", quantization="int8", quantize_lm_head=False).engine.model
    assert isinstance(model.lm_head, Linear) and isinstance(model.model.embed_tokens, Embedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)


def test_unknown_method_is_a_clear_error(llama_path):
    with pytest.raises(InvalidArgumentError, match="quantization 'int3'.*int8, int4"):
        LLM(str(llama_path), quantization="int3")


def test_unsupported_group_size_is_a_clear_error(llama_path):
    with pytest.raises(InvalidArgumentError, match="group size 48 is not supported.*32, 64, 128, 256"):
        LLM(str(llama_path), quantization="int4", quantization_group_size=48)


def test_group_size_that_does_not_divide_a_layer_names_it(checkpoint_factory):
    path = str(checkpoint_factory("llama-untied-bias-headdim"))  # o_proj reads 4 heads x 24 = 96 features
    with pytest.raises(InvalidArgumentError, match=r"group size 64 does not divide the 96 input features of "
                                                   r"model\.layers\.0\.self_attn\.o_proj: use group size 32"):
        LLM(path, quantization="int4", quantization_group_size=64)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_checkpoint_quantized_by_another_tool_is_refused_by_name(llama_path, tmp_path, method):
    folder = tmp_path / method
    shutil.copytree(llama_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=f"quantized with '{method}', which lmgen cannot load"):
        LLM(str(folder))
