"""lmgen's kernels over GGUF's block formats (kernels/ggml_blocks.cpp, layers/ggml.py): each type's
dequantization is the gguf package's, and its products are those of the gguf package's dequantized
weights with the activations rounded to int8 in blocks of the format's block size (32 as llama.cpp's
q8_0, 256 for the K-quants as its q8_K), the way the kernels multiply them."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from gguf_files import K_QUANTS, random_k_blocks
from lmgen.layers import ggml
from lmgen.layers.ggml import GGMLLinear
from lmgen.layers.linear import FusedLinear

pytestmark = pytest.mark.usefixtures("cpu_kernels")

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ROWS = [1, 2, 15, 16, 17, 64]  # blocks of 4 activation rows and every remainder, up to ggml.BLOCK_PRODUCT_MAX_ROWS
IN_FEATURES = 512  # two K-quant blocks, sixteen of 32


def _blocks(kind: Q, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [rows, bytes per row], the gguf package's dequantization of them [rows, K])."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32) * np.linspace(0.01, 3, shape[0], dtype=np.float32)[:, None]
    data = random_k_blocks(shape, kind, rng) if kind in K_QUANTS else gguf.quants.quantize(values, kind)
    return torch.from_numpy(data.copy()), torch.from_numpy(gguf.quants.dequantize(data, kind).copy())


def _rounded_per_block(x: torch.Tensor, kind: Q) -> torch.Tensor:
    """x as the kernels multiply it with a weight of type `kind`: each block of columns rounded to int8
    with its own scale."""
    grouped = x.view(x.shape[0], -1, 256 if kind in K_QUANTS else 32)
    top = grouped.abs().amax(-1, keepdim=True)
    return ((grouped * torch.where(top > 0, 127 / top, 0)).round() * (top / 127)).view_as(x)


def _assert_product(out: torch.Tensor, x: torch.Tensor, parts: list[tuple[Q, torch.Tensor]]) -> None:
    """Equal to the float product of the parts' weights with x rounded per block of each part's type, up to
    float32 summation order; and that rounding moves the product by what llama.cpp's does (well under 2%)."""
    expected = torch.cat([F.linear(_rounded_per_block(x, kind).double(), weight.double()) for kind, weight in parts], -1)
    weight = torch.cat([weight for _, weight in parts])
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())
    exact = F.linear(x.double(), weight.double())
    assert (out.double() - exact).norm() < 0.02 * exact.norm()


@pytest.mark.parametrize("kind", TYPES, ids=lambda kind: kind.name)
def test_dequantize_blocks_equals_the_gguf_package(kind):
    blocks, weight = _blocks(kind, (40, IN_FEATURES), 0)
    ours = torch.ops.lmgen.dequantize_blocks(blocks, int(kind), IN_FEATURES)
    assert torch.allclose(ours, weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", TYPES, ids=lambda kind: kind.name)
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_blocks_is_the_dequantized_product_of_rounded_activations(kind, rows):
    blocks, weight = _blocks(kind, (203, IN_FEATURES), rows)  # 203: a thread's share is no multiple of 4 or 8
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows))
    layout = torch.tensor([[int(kind), 203]])
    _assert_product(torch.ops.lmgen.gemv_blocks(x, blocks, layout), x, [(kind, weight)])
    half = torch.ops.lmgen.gemv_blocks(x.bfloat16(), blocks, layout)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), torch.ops.lmgen.gemv_blocks(x.bfloat16().float(), blocks, layout).bfloat16().float())


@pytest.mark.parametrize("kind", list(ggml.LAID_OUT), ids=lambda kind: Q(kind).name)
@pytest.mark.parametrize("rows", ROWS)
def test_rows_laid_out_8_at_a_time_are_the_same_weight(kind, rows):
    """pack_blocks lays rows out 8 at a time in place (rows padded to a wider layout where it is one): the
    same dequantized values, and products as the rows' own, whose integer sums they share."""
    blocks, weight = _blocks(Q(kind), (200, IN_FEATURES), rows)  # 25 groups of 8: threads' shares are no multiple of 4
    laid_out = torch.zeros(200, ggml.row_bytes(kind, IN_FEATURES, laid_out=True), dtype=torch.uint8)
    laid_out[:, :blocks.shape[1]] = blocks
    laid_out_kind = torch.ops.lmgen.pack_blocks(laid_out, kind, IN_FEATURES)
    assert laid_out_kind == ggml.LAID_OUT[kind][0]
    assert torch.equal(torch.ops.lmgen.dequantize_blocks(laid_out, laid_out_kind, IN_FEATURES),
                       torch.ops.lmgen.dequantize_blocks(blocks, kind, IN_FEATURES))
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows))
    out = torch.ops.lmgen.gemv_blocks(x, laid_out, torch.tensor([[laid_out_kind, 200]]))
    _assert_product(out, x, [(Q(kind), weight)])
    row_by_row = torch.ops.lmgen.gemv_blocks(x, blocks, torch.tensor([[kind, 200]]))
    assert torch.allclose(out, row_by_row, rtol=1e-5, atol=1e-5 * row_by_row.abs().max().item())


def test_only_some_types_rows_in_eights_are_laid_out():
    blocks, _ = _blocks(Q.Q4_K, (12, IN_FEATURES), 0)
    with pytest.raises(RuntimeError, match="rows come in eights, got 12"):
        torch.ops.lmgen.pack_blocks(torch.zeros(12, 296, dtype=torch.uint8), int(Q.Q4_K), IN_FEATURES)
    with pytest.raises(RuntimeError, match="do not fit rows of 288 bytes"):
        torch.ops.lmgen.pack_blocks(blocks[:8].clone(), int(Q.Q4_K), IN_FEATURES)  # no room for the layout
    with pytest.raises(RuntimeError, match="only Q4_K, Q5_0, Q6_K and Q8_0 rows .* not ggml type 13"):
        torch.ops.lmgen.pack_blocks(torch.zeros(8, 352, dtype=torch.uint8), int(Q.Q5_K), IN_FEATURES)


def _fused(parts: list[tuple[Q, int]], bias: bool) -> tuple[GGMLLinear, list[tuple[Q, torch.Tensor]]]:
    """A fused layer of parts in different types, as Q4_K_M files store q/k/v, packed as loading packs it (the
    parts whose rows come in eights laid out 8 at a time); and each part's float weight."""
    linear = FusedLinear(IN_FEATURES, [rows for _, rows in parts], bias=bias)
    if bias:
        linear.bias.data.normal_()
    layer = GGMLLinear(linear, [int(kind) for kind, _ in parts])
    first, weights = 0, []
    for seed, (kind, rows) in enumerate(parts):
        blocks, weight = _blocks(kind, (rows, IN_FEATURES), seed)
        layer.weight.data[first:first + rows, :blocks.shape[1]] = blocks
        first, weights = first + rows, [*weights, (kind, weight)]
    layer.pack()
    return layer, weights


@pytest.mark.parametrize("rows", [1, 17, 64, 65, 130])
def test_a_fused_layer_of_mixed_types_in_decode_and_prefill(rows, monkeypatch):
    """Up to ggml.BLOCK_PRODUCT_MAX_ROWS rows on the block kernels; beyond, the parts laid out 8 rows at a time
    still on theirs, the others dequantized a tile of rows at a time (tiles cut inside parts here) for a
    float32 product."""
    monkeypatch.setattr(ggml, "_TILE_VALUES", 50 * IN_FEATURES)
    layer, parts = _fused([(Q.Q4_K, 72), (Q.Q6_K, 33), (Q.Q8_0, 66), (Q.Q5_0, 8)], bias=True)
    assert layer.types == [ggml.LAID_OUT[Q.Q4_K][0], Q.Q6_K, Q.Q8_0, ggml.LAID_OUT[Q.Q5_0][0]]
    x = torch.randn(1, rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows))  # [batch, tokens, K]
    out = layer(x)[0] - layer.bias
    weight = torch.cat([weight for _, weight in parts])
    assert out.shape == (rows, weight.shape[0])
    first = 0
    for (kind, part), held in zip(parts, layer.types):
        columns = out[:, first:first + len(part)]
        if rows <= 64 or held != kind:
            _assert_product(columns, x[0], [(kind, part)])
        else:
            assert torch.allclose(columns, F.linear(x[0], part), rtol=1e-4, atol=1e-4)
        first += len(part)
    assert torch.allclose(layer.dequantized(), weight, rtol=1e-6, atol=1e-7)
