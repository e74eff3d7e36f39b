"""lmgen's CPU kernels (lmgen/kernels): products equal PyTorch's on the same inputs, and the fallback."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmgen import kernels
from lmgen.layers.linear import linear
from lmgen.layers.quant import dequantize_int4, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not kernels.load(), reason="lmgen's CPU kernels need an AVX2 CPU and a C++ compiler")

ROWS = [1, 2, 3, 4, 5, 7, 8, 13, 32]  # blocks of 4 rows and every remainder


def _inputs(rows: int, out_features: int = 200, in_features: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(rows)
    # rows of very different magnitudes: a kernel mixing up rows or columns cannot pass
    weight = torch.randn(out_features, in_features) * torch.linspace(0.01, 3, out_features)[:, None]
    return torch.randn(rows, in_features), weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_equals_f_linear_on_the_same_weights(dtype, rows):
    x, weight = _inputs(rows)
    weight = weight.to(dtype)
    assert torch.allclose(torch.ops.lmgen.gemv(x, weight), F.linear(x, weight.float()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", ROWS)
def test_gemv_int8_equals_the_dequantized_linear(rows):
    x, weight = _inputs(rows)
    q, scales = quantize_int8(weight)
    expected = F.linear(x, q.float() * scales.float()[:, None])
    assert torch.allclose(torch.ops.lmgen.gemv_int8(x, q, scales), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_int4_equals_the_dequantized_linear(group_size, rows):
    x, weight = _inputs(rows, in_features=256)
    nibbles, scales, zeros = quantize_int4(weight, group_size)
    expected = F.linear(x, dequantize_int4(nibbles, scales, zeros))
    # activations are rounded to int16 per group: finer than bfloat16
    assert torch.allclose(torch.ops.lmgen.gemv_int4(x, nibbles, scales, zeros), expected, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_decode_attention_reads_the_paged_cache_like_sdpa_over_the_gathered_context(dtype, window, head_dim):
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, heads = 40, 16, 3, 9
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2))
    seq_lens = torch.tensor([1, 17, 40, 128, 100])
    block_tables = torch.stack([torch.randperm(num_blocks)[:8] for _ in seq_lens])
    q = torch.randn(len(seq_lens), heads, head_dim)
    out = torch.ops.lmgen.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.125, window)
    for b, length in enumerate(seq_lens.tolist()):
        slots = (block_tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[:length]
        first = max(0, length - window) if window else 0
        keys, values = (cache.view(-1, kv_heads, head_dim)[slots][first:].float().transpose(0, 1)[None]
                        for cache in (k_cache, v_cache))
        expected = F.scaled_dot_product_attention(q[b].view(1, heads, 1, head_dim), keys, values, scale=0.125,
                                                  enable_gqa=True)
        assert torch.allclose(out[b], expected[0, :, 0], atol=1e-5)


def test_the_layers_take_the_kernels_for_few_rows_and_pytorch_for_many(monkeypatch):
    calls = []
    gemv = torch.ops.lmgen.gemv
    monkeypatch.setattr(torch.ops.lmgen, "gemv", lambda *args: calls.append(args[0].shape[0]) or gemv(*args),
                        raising=False)
    weight = torch.randn(64, 96, dtype=torch.bfloat16)
    for rows in (1, kernels.MAX_ROWS, kernels.MAX_ROWS + 1):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        assert torch.allclose(linear(x, weight).float(), F.linear(x.float(), weight.float()), rtol=2e-2, atol=2e-2)
    assert calls == [1, kernels.MAX_ROWS]


def test_kernel_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.lmgen.gemv(torch.randn(1, 40), torch.randn(8, 40))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lmgen.gemv(torch.randn(1, 64, dtype=torch.float64), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.lmgen.gemv(torch.randn(1, 64), torch.randn(8, 96))


def test_lmgen_cpu_kernels_0_turns_them_off():
    code = "from lmgen import kernels; print(kernels.load())"
    result = subprocess.run([sys.executable, "-c", code], env={"LMGEN_CPU_KERNELS": "0", "PATH": ""},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
