"""lmgen's CPU kernels (lmgen/kernels): products equal PyTorch's on the same inputs, and the fallback."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmgen import kernels
from lmgen.layers.attention import attention_beyond_sdpa
from lmgen.layers.linear import Activation, MLPActivation, SwigluClamp, linear
from lmgen.layers.norm import Norm, NormKind
from lmgen.layers.quant import (deinterleave_int4, dequantize_int4, interleave_int4, quantize_int4, quantize_int8,
                                unpack_int4)
from lmgen.layers.rotary import apply_rotary

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips where they cannot run, fails where they did not build

# few rows (streams): blocks of 4 rows and every remainder; from kernels.TILE_MIN_ROWS per weight byte on
# (int8 16, half precision 32, float32 64), tiles of 4 rows and 3 weight rows, with remainders of both
ROWS = [1, 2, 3, 4, 5, 7, 13, 15, 16, 17, 22, 31, 32, 33, 63, 64, 65, 200]


def _inputs(rows: int, out_features: int = 200, in_features: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(rows)
    # rows of very different magnitudes: a kernel mixing up rows or columns cannot pass
    weight = torch.randn(out_features, in_features) * torch.linspace(0.01, 3, out_features)[:, None]
    return torch.randn(rows, in_features), weight


# 203 output rows: some left over after each thread's rows are cut into the kernels' read streams
@pytest.mark.parametrize("out_features", [200, 203])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_equals_f_linear_on_the_same_weights(dtype, rows, out_features):
    x, weight = _inputs(rows, out_features)
    weight = weight.to(dtype)
    assert torch.allclose(torch.ops.lmgen.gemv(x, weight), F.linear(x, weight.float()), rtol=1e-5, atol=1e-4)


def _rounded_per_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x as the int8 and int4 kernels multiply it: each group of columns rounded to int8 with its own
    scale (llama.cpp's q8_0 and q4_0 method)."""
    grouped = x.view(x.shape[0], -1, group_size)
    top = grouped.abs().amax(-1, keepdim=True)
    return ((grouped * torch.where(top > 0, 127 / top, 0)).round() * (top / 127)).view_as(x)


def _assert_rounding_x_costs_at_most(out, x, weight, times):
    """The product's error against the exact one is within `times` the error rounding x to bfloat16 gives."""
    exact = F.linear(x.double(), weight.double())
    as_bfloat16 = F.linear(x.bfloat16().double(), weight.double())
    assert (out - exact).norm() < times * (as_bfloat16 - exact).norm()


@pytest.mark.parametrize("out_features", [200, 203])
@pytest.mark.parametrize("in_features", [96, 128])  # an odd number of 32-column groups, and an even one
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_int8_equals_its_definition_and_stays_near_the_dequantized_linear(rows, in_features, out_features):
    x, weight = _inputs(rows, out_features, in_features)
    q, scales = quantize_int8(weight)
    dequantized = q.float() * scales.float()[:, None]
    out = torch.ops.lmgen.gemv_int8(x, q, scales)
    if rows >= kernels.TILE_MIN_ROWS:  # float32 tiles: x as it is
        assert torch.allclose(out, F.linear(x, dequantized), rtol=1e-5, atol=1e-4)
        return
    assert torch.allclose(out, F.linear(_rounded_per_group(x, 32), dequantized), rtol=1e-5, atol=1e-4)
    _assert_rounding_x_costs_at_most(out, x, dequantized, 6)


def _int4_product(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """What the int4 kernel computes, in PyTorch: x rounded per group multiplies the levels' part of the
    weight; the zeros' part takes x as it is."""
    group_size = x.shape[1] // scales.shape[1]
    zero_part = zeros.float().repeat_interleave(group_size, dim=1)
    return (F.linear(_rounded_per_group(x, group_size), dequantize_int4(nibbles, scales, zeros) - zero_part)
            + F.linear(x, zero_part))


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("groups", [3, 4])
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 65])  # one row (streams), else tiles of 8 weight rows
def test_gemv_int4_equals_its_definition_and_stays_near_the_dequantized_linear(group_size, groups, rows):
    x, weight = _inputs(rows, out_features=200, in_features=groups * group_size)  # 25 blocks of 8 rows: 1 left over
    nibbles, scales, zeros = quantize_int4(weight, group_size)
    out = torch.ops.lmgen.gemv_int4(x, *interleave_int4(nibbles, scales, zeros))
    assert torch.allclose(out, _int4_product(x, nibbles, scales, zeros), rtol=1e-5, atol=1e-4)
    # rounding x to int8 costs 3-5x what rounding it to bfloat16 would (the 4-bit weights' own rounding: 45-65x)
    _assert_rounding_x_costs_at_most(out, x, dequantize_int4(nibbles, scales, zeros), 6)


@pytest.mark.parametrize("rows", [65, 200])
def test_products_of_rows_in_several_panels_equal_the_reference(rows):
    """Wide rows: the tiles cut 2048 columns into chunks of 704, 704 and 640 and take the activation rows a
    panel (192 KiB) at a time, here 68 float32 rows of a chunk (int4: 96 int8 rows of 2048), the last partial."""
    x, weight = _inputs(rows, out_features=40, in_features=2048)
    for dtype in (torch.float32, torch.float16):
        assert torch.allclose(torch.ops.lmgen.gemv(x, weight.to(dtype)), F.linear(x, weight.to(dtype).float()),
                              rtol=1e-5, atol=1e-3)
    q, scales = quantize_int8(weight)
    assert torch.allclose(torch.ops.lmgen.gemv_int8(x, q, scales), F.linear(x, q.float() * scales.float()[:, None]),
                          rtol=1e-5, atol=1e-3)
    nibbles, group_scales, zeros = quantize_int4(weight, 128)
    assert torch.allclose(torch.ops.lmgen.gemv_int4(x, *interleave_int4(nibbles, group_scales, zeros)),
                          _int4_product(x, nibbles, group_scales, zeros), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("in_features", [64, 100])  # 100: columns left over after the vectors of 8
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_dequantize_int8_equals_pytorchs_product_of_levels_and_scales(in_features, scale_dtype):
    q, scales = quantize_int8(torch.randn(200, in_features))
    scales = scales.to(scale_dtype)
    assert torch.equal(torch.ops.lmgen.dequantize_int8(q, scales), q.float() * scales.float()[:, None])


@pytest.mark.parametrize("group_size", [32, 64, 256])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_dequantize_int4_from_the_kernel_layout_equals_the_storage_forms_dequantization(group_size, scale_dtype):
    nibbles, scales, zeros = quantize_int4(torch.randn(200, 3 * group_size), group_size)
    scales, zeros = scales.to(scale_dtype), zeros.to(scale_dtype)
    expected = dequantize_int4(nibbles, scales, zeros)
    assert torch.equal(torch.ops.lmgen.dequantize_int4(*interleave_int4(nibbles, scales, zeros)), expected)


def test_the_int4_kernel_layout_pairs_columns_j_and_j_plus_4_and_interleaves_8_rows_per_chunk():
    nibbles = torch.randint(0, 256, (16, 64), dtype=torch.uint8)  # 16 rows of 16 chunks (128 columns)
    scales, zeros = torch.randn(16, 3), torch.randn(16, 3)  # 3 groups
    interleaved, scales_il, zeros_il = interleave_int4(nibbles, scales, zeros)
    levels = unpack_int4(nibbles)
    lane = interleaved.view(2, 16, 8, 4)[1, 9, 5]  # rows 8-15, chunk 9 (columns 72-79), row 13
    assert torch.equal(lane & 0xF, levels[13, 72:76]) and torch.equal(lane >> 4, levels[13, 76:80])
    assert torch.equal(scales_il.view(2, 3, 8)[1, 2], scales[8:, 2])  # rows 8-15: group 2's scales side by side
    assert torch.equal(zeros_il.view(2, 3, 8)[0, 1], zeros[:8, 1])
    for restored, original in zip(deinterleave_int4(interleaved, scales_il, zeros_il), (nibbles, scales, zeros)):
        assert torch.equal(restored, original)


@pytest.fixture
def four_threads():
    """As many threads as a 4-core machine: the spans decode attention cuts depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
# one request: its positions are cut into spans whose partial sums merge; several: a piece per request and head
@pytest.mark.parametrize("lengths", [[1, 17, 40, 128, 100], [128], [128, 3]])
# query heads per KV head: 3 (bench-125m), 1 (no grouping), 7 (Qwen2.5-0.5B)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (14, 2)])
def test_decode_attention_reads_the_paged_cache_like_sdpa_over_the_gathered_context(dtype, window, head_dim, lengths,
                                                                                  heads, kv_heads, four_threads):
    torch.manual_seed(0)
    num_blocks, block_size = 40, 16
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2))
    seq_lens = torch.tensor(lengths)
    block_tables = torch.stack([torch.randperm(num_blocks)[:8] for _ in seq_lens])
    q = torch.randn(len(seq_lens), heads, head_dim)
    out = torch.ops.lmgen.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.125, window, 0.0)
    for b, length in enumerate(seq_lens.tolist()):
        slots = (block_tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[:length]
        first = max(0, length - window) if window else 0
        keys, values = (cache.view(-1, kv_heads, head_dim)[slots][first:].float().transpose(0, 1)[None]
                        for cache in (k_cache, v_cache))
        expected = F.scaled_dot_product_attention(q[b].view(1, heads, 1, head_dim), keys, values, scale=0.125,
                                                  enable_gqa=True)
        assert torch.allclose(out[b], expected[0, :, 0], atol=1e-5)


def test_the_layers_take_the_kernels_for_any_number_of_rows_and_pytorch_for_other_widths(monkeypatch):
    calls = []
    gemv = torch.ops.lmgen.gemv
    monkeypatch.setattr(torch.ops.lmgen, "gemv", lambda *args: calls.append(args[0].shape[0]) or gemv(*args),
                        raising=False)
    for rows, columns in ((1, 96), (512, 96), (3, 72)):  # 72 columns: not a multiple of 32
        weight = torch.randn(64, columns, dtype=torch.bfloat16)
        x = torch.randn(rows, columns, dtype=torch.bfloat16)
        assert torch.allclose(linear(x, weight).float(), F.linear(x.float(), weight.float()), rtol=2e-2, atol=2e-2)
    assert calls == [1, 512]


def test_kernel_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.lmgen.gemv(torch.randn(1, 40), torch.randn(8, 40))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lmgen.gemv(torch.randn(1, 64, dtype=torch.float64), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.lmgen.gemv(torch.randn(1, 64), torch.randn(8, 96))
    nibbles, scales, zeros = quantize_int4(torch.randn(12, 64), 32)
    with pytest.raises(RuntimeError, match="rows in groups of 8"):
        torch.ops.lmgen.gemv_int4(torch.randn(1, 64), nibbles, scales, zeros)
    with pytest.raises(RuntimeError, match="dequantize_int8: one scale per weight row"):
        torch.ops.lmgen.dequantize_int8(*quantize_int8(torch.randn(8, 64))[:1], torch.ones(7))
    with pytest.raises(RuntimeError, match="dequantize_int4: the weight must be .* in the int4 kernel's layout"):
        torch.ops.lmgen.dequantize_int4(nibbles, scales, zeros)  # 12 rows: not blocks of 8
    nibbles, scales, zeros = quantize_int4(torch.randn(16, 64), 32)
    with pytest.raises(RuntimeError, match="dequantize_int4: scales and zeros"):
        torch.ops.lmgen.dequantize_int4(nibbles, scales, zeros[:, :1])
    cache = torch.zeros(2, 16, 1, 32)
    with pytest.raises(RuntimeError, match=r"sinks must be a float tensor \[H\], one per query head"):
        torch.ops.lmgen.decode_attention(torch.randn(1, 2, 32), cache, cache, torch.zeros(1, 1, dtype=torch.long),
                                         torch.ones(1, dtype=torch.long), 1.0, 0, 0.0, torch.zeros(1))
    with pytest.raises(RuntimeError, match="the clamped SwiGLU is gated and needs a positive alpha and limit"):
        torch.ops.lmgen.activation(torch.randn(2, 64), int(Activation.CLAMPED_SWIGLU), True)


def test_lmgen_cpu_kernels_0_turns_them_off():
    code = "from lmgen import kernels; print(kernels.load(), kernels.build_failed, kernels.why_not)"
    result = subprocess.run([sys.executable, "-c", code], env={"LMGEN_CPU_KERNELS": "0", "PATH": ""},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False LMGEN_CPU_KERNELS=0 turns them off"


def test_a_source_that_does_not_compile_is_a_build_failure_with_the_compilers_message(tmp_path):
    """What the cpu_kernels fixture fails the kernel tests on, rather than skipping them."""
    broken = tmp_path / "cpu.cpp"
    broken.write_text('#error "a deliberately broken copy"\n')
    code = ("import pathlib; from lmgen import kernels; kernels._SOURCES = [pathlib.Path(r'%s')]; "
            "print(kernels.load(), kernels.build_failed); print(kernels.why_not)" % broken)
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LMGEN_CACHE": str(tmp_path)},
                            capture_output=True, text=True, check=True)
    first, reason = result.stdout.split("\n", 1)
    assert first == "False True"
    assert reason.startswith("building them failed") and "a deliberately broken copy" in reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_products_take_and_give_half_precision_rows_rounded_once(dtype, rows):
    x, weight = _inputs(rows, in_features=256)
    x = x.to(dtype)
    q, scales = quantize_int8(weight)
    nibbles, group_scales, zeros = quantize_int4(weight, 64)
    for product, args in ((torch.ops.lmgen.gemv, (weight.to(dtype),)), (torch.ops.lmgen.gemv_int8, (q, scales)),
                          (torch.ops.lmgen.gemv_int4, interleave_int4(nibbles, group_scales, zeros))):
        out = product(x, *args)
        assert out.dtype == dtype
        assert torch.equal(out, product(x.float(), *args).to(dtype))


def test_decode_attention_gives_half_precision_queries_their_dtype():
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(8, 16, 2, 64).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(3, 4, 64).to(torch.bfloat16)
    args = (k_cache, v_cache, torch.randperm(8)[:6].view(3, 2), torch.tensor([5, 32, 17]), 0.125, 0, 0.0)
    out = torch.ops.lmgen.decode_attention(q, *args)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.ops.lmgen.decode_attention(q.float(), *args).to(torch.bfloat16))


def _assert_within_a_few_ulps(fast: torch.Tensor, reference: torch.Tensor, offset: float = 0.0) -> None:
    """float32: within 4 ulps; half precision: within one rounding step, and mostly equal. A value an
    `offset` was added to (a LayerNorm's bias) may be off by that many ulps of the offset."""
    assert fast.dtype == reference.dtype
    ulps = 4 if fast.dtype == torch.float32 else 2
    eps = torch.finfo(fast.dtype).eps
    assert torch.allclose(fast.float(), reference.float(), rtol=ulps * eps, atol=ulps * eps * offset or 1e-30)
    if fast.dtype != torch.float32:
        assert (fast == reference).float().mean() > 0.97


def _with_and_without_kernels(monkeypatch, layer, *inputs):
    """The layer's output on lmgen's kernel and on its PyTorch path."""
    fast = layer(*inputs)
    monkeypatch.setattr(kernels, "loaded", False)
    return fast, layer(*inputs)


@pytest.mark.parametrize("kind, offset", [(NormKind.RMS, 0.0), (NormKind.RMS_GAIN_IN_FLOAT, 1.0),
                                          (NormKind.RMS_GAIN_IN_FLOAT, 0.0), (NormKind.LAYER, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 37])  # 37: columns past the last full vector
def test_norm_kernel_with_and_without_a_residual_equals_the_pytorch_path(monkeypatch, dtype, hidden, kind, offset):
    torch.manual_seed(hidden)
    norm = Norm(hidden, eps=1e-5, kind=kind, offset=offset)
    norm.weight.data = (torch.rand(hidden) + 0.5 - offset).to(dtype)
    if norm.bias is not None:
        norm.bias.data = torch.randn(hidden).to(dtype)
    x = (torch.randn(5, hidden) * torch.linspace(0.1, 10, 5)[:, None]).to(dtype)
    residual = torch.randn(5, hidden).to(dtype)
    (fast, (fast_added, fast_sum)), (reference, (added, total)) = _with_and_without_kernels(
        monkeypatch, lambda *inputs: (norm(inputs[0]), norm(*inputs)), x, residual)
    # the sum of squares is added in another order: a float32 ulp, which rounding to bfloat16 mostly hides
    bias = 0.0 if norm.bias is None else norm.bias.abs().max().item()
    _assert_within_a_few_ulps(fast, reference, bias)
    _assert_within_a_few_ulps(fast_added, added, bias)
    assert torch.equal(fast_sum, total) and torch.equal(total, x + residual)


@pytest.mark.parametrize("kind, gated", [(Activation.SILU, True), (Activation.SILU, False), (Activation.GELU_TANH, True),
                                         (Activation.GELU_TANH, False), (Activation.CLAMPED_SWIGLU, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1536, 13])  # 13: values past the last full vector
def test_activation_kernel_equals_the_pytorch_path(monkeypatch, dtype, width, kind, gated):
    torch.manual_seed(width)
    x = (torch.randn(3, (2 if gated else 1) * width) * 4).to(dtype)  # past the clamp's limit 7 too
    clamp = SwigluClamp(alpha=1.702, limit=7.0) if kind == Activation.CLAMPED_SWIGLU else None
    fast, reference = _with_and_without_kernels(monkeypatch, MLPActivation(kind, gated, clamp), x)
    assert fast.shape == (3, width)
    if kind == Activation.CLAMPED_SWIGLU:  # the sigmoid's exp: lmgen's polynomial, then one rounding after each step
        ulps = 4 if dtype == torch.float32 else 2
        assert torch.allclose(fast.float(), reference.float(), rtol=ulps * torch.finfo(dtype).eps, atol=1e-6)
    elif kind == Activation.SILU:
        _assert_within_a_few_ulps(fast, reference)  # exp is lmgen's polynomial, PyTorch's is Sleef's
    else:  # as 1 / (1 + exp): a few ulps, where PyTorch takes 1 + tanh (which cancels for x << 0)
        ulps = 4 if dtype == torch.float32 else 2
        assert torch.allclose(fast.float(), reference.float(), rtol=ulps * torch.finfo(dtype).eps, atol=1e-6)


def test_decode_attention_soft_caps_scores_like_the_reference():
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(6, 16, 2, 32) * 3 for _ in range(2))
    q = torch.randn(2, 4, 32) * 3
    tables, lens = torch.tensor([[0, 3], [5, 1]]), torch.tensor([20, 31])
    out = torch.ops.lmgen.decode_attention(q, k_cache, v_cache, tables, lens, 0.5, 0, 2.0)
    for b in range(2):
        keys, values = (c[tables[b]].reshape(-1, 2, 32)[: lens[b]].transpose(0, 1)[None] for c in (k_cache, v_cache))
        mask = torch.ones(1, 1, 1, int(lens[b]), dtype=torch.bool)
        expected = attention_beyond_sdpa(q[b][None, :, None], keys, values, mask, 0.5, 2.0, None)[0, :, 0]
        assert torch.allclose(out[b], expected, atol=1e-5)
    assert not torch.allclose(out, torch.ops.lmgen.decode_attention(q, k_cache, v_cache, tables, lens, 0.5, 0, 0.0))


@pytest.mark.parametrize("window", [0, 24])
def test_decode_attention_adds_sinks_to_the_denominator_like_the_reference(window, four_threads):
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(12, 16, 2, 32) * 2 for _ in range(2))
    q = torch.randn(2, 4, 32) * 2
    tables, lens = torch.tensor([[0, 3, 7, 9, 11], [5, 1, 2, 4, 6]]), torch.tensor([75, 31])  # several spans merged
    sinks = torch.tensor([3.0, -1.0, 0.5, 8.0])
    out = torch.ops.lmgen.decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, 0.0, sinks)
    for b in range(2):
        first = max(0, int(lens[b]) - window) if window else 0
        keys, values = (c[tables[b]].reshape(-1, 2, 32)[first: lens[b]].transpose(0, 1)[None]
                        for c in (k_cache, v_cache))
        mask = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
        expected = attention_beyond_sdpa(q[b][None, :, None], keys, values, mask, 0.25, None, sinks)[0, :, 0]
        assert torch.allclose(out[b], expected, atol=1e-5)
    assert not torch.allclose(out, torch.ops.lmgen.decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (24, 24), (64, 48), (96, 32)])  # 24: halves that are
def test_rotary_kernel_rounds_exactly_as_the_pytorch_path(monkeypatch, dtype, head_dim, rotary_dim):  # not vectors
    torch.manual_seed(0)
    tokens, heads = 4, 5
    qkv = torch.randn(tokens, (heads + 2) * head_dim).to(dtype)
    x = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # strided rows, as in the model
    angles = torch.rand(tokens, 1, rotary_dim // 2) * 6
    cos, sin = (torch.cat((f, f), dim=-1).to(dtype) for f in (angles.cos(), angles.sin()))
    fast, reference = _with_and_without_kernels(monkeypatch, apply_rotary, x, cos, sin)
    assert torch.equal(fast, reference)
