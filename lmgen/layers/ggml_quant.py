"""Float weights quantized into GGUF block formats, as llama.cpp's reference quantizers do.

``quantize_blocks`` writes a weight's rows as the blocks llama.cpp's ``llama-quantize`` writes for the
same float tensor (without an importance matrix): the same bytes, so that a checkpoint quantized while
loading (``quantization="q4_k_m"``: lmgen/layers/ggml_recipes.py) runs the weights a GGUF file made
from it would hold. The searches are llama.cpp's: Q4_K and Q5_K fit a scale and an offset per 32
values by trying a range of grid spacings and keeping the one of least weighted squared error (the
weights favour large values), then quantize the 8 scales and 8 offsets of a super-block to 6 bits;
Q6_K tries 19 spacings per 16 values for a symmetric grid, weighted by the values' squares; the
32-value formats take their scale from the group's largest magnitude (Q5_0, Q8_0) or its range (Q5_1).

Every step runs over all blocks at once in float32, rounding as the C code does: sums add one term
after another (a torch reduction pairs terms and rounds differently), ``nearest_int`` rounds half to
even (``torch.round``), ``roundf`` half away from zero, casts truncate; a number divided by a tensor is
a 0-dim tensor (torch turns ``15 / t`` into a product with 1 / t, one rounding more), square roots
are taken in float64 (torch's float32 one can be an ulp off). Scales are stored in float16.
"""

from __future__ import annotations

import torch

Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 6, 7, 8, 12, 13, 14
#: ggml type -> (values, bytes) of its block
BLOCK_SIZES = {Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
TYPE_NAMES = {Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
_GROUP_MAX_EPS = 1e-15  # ggml's: a group whose largest magnitude is below this is all zeros
# Values quantized per step: bounds the candidates' transient tensors (about 25 x this many float32).
_CHUNK_VALUES = 1 << 20


def quantize_blocks(weight: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """A float weight [N, K] -> its rows as `ggml_type` blocks, uint8 [N, K / values * bytes]."""
    values, nbytes = BLOCK_SIZES[ggml_type]
    rows, cols = weight.shape
    blocks = weight.reshape(-1, values)
    step = max(1, _CHUNK_VALUES // values)
    quantize = _QUANTIZERS[ggml_type]
    # Thousands of small steps (the running sums): on one thread, as a parallel region each cost more than
    # it saved (8-15x slower on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = [quantize(chunk.float()) for chunk in blocks.split(step)]
    finally:
        torch.set_num_threads(threads)
    return torch.cat(out).view(rows, cols // values * nbytes) if out else torch.empty(rows, 0, dtype=torch.uint8)


# ---- helpers --------------------------------------------------------------------------------
def _running_sum(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum over `dim`, adding one term after another in float32 as a C loop does."""
    parts = terms.unbind(dim)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def _squared(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (torch's float32 one is off by an ulp at times)."""
    return x.double().sqrt().float()


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 [B] -> their float16 bytes [B, 2] (little-endian)."""
    return values.half().view(torch.uint8).view(-1, 2)


def _first_largest_magnitude(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The value of largest magnitude along `dim`, the first on a tie (the C loops' strict >)."""
    return x.gather(dim, x.abs().argmax(dim, keepdim=True)).squeeze(dim)


def _pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return (low & 0xF) | ((high & 0xF) << 4)


def _high_bits(levels: torch.Tensor) -> torch.Tensor:
    """5-bit levels [B, 32] -> their 5th bits as a little-endian uint32 [B, 4] (bit j: value j)."""
    bits = (levels >> 4) & 1
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return (bits.view(-1, 4, 8) * weights).sum(-1).to(torch.uint8)


# ---- the 32-value formats -----------------------------------------------------------------------
def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(1) / 127
    inverse = torch.where(d != 0, _f32(1.0) / d, _f32(0.0))
    scaled = x * inverse[:, None]
    levels = torch.round(scaled)  # roundf: ties away from zero
    ties = (scaled - scaled.trunc()).abs() == 0.5
    levels = torch.where(ties, scaled.trunc() + scaled.sign(), levels).to(torch.int8)
    return torch.cat([_half_bytes(d), levels.view(torch.uint8)], 1)


def _five_bit_levels(levels: torch.Tensor) -> torch.Tensor:
    """5-bit levels [B, 32] as Q5_0 and Q5_1 store them after their scales: the 5th bits, then the low nibbles."""
    return torch.cat([_high_bits(levels), _pack_nibbles(levels[:, :16], levels[:, 16:]).to(torch.uint8)], 1)


def _quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _first_largest_magnitude(x, 1) / -16
    inverse = torch.where(d != 0, _f32(1.0) / d, _f32(0.0))
    levels = (x * inverse[:, None] + 16.5).trunc().clamp(max=31).to(torch.int32)
    return torch.cat([_half_bytes(d), _five_bit_levels(levels)], 1)


def _quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    low, high = x.amin(1), x.amax(1)
    d = (high - low) / 31
    inverse = torch.where(d != 0, _f32(1.0) / d, _f32(0.0))
    levels = ((x - low[:, None]) * inverse[:, None] + 0.5).trunc().to(torch.int32)
    return torch.cat([_half_bytes(d), _half_bytes(low), _five_bit_levels(levels)], 1)


# ---- Q4_K and Q5_K: a scale and an offset per 32 values ---------------------------------------------
def _fit_scale_and_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, steps: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants for groups x [n, B] (values first) with error weights w: the levels
    [n, B] in 0..nmax, the scale [B] and the offset [B] (w ≈ scale * level - offset) of least weighted
    squared error among the range's own grid and `steps` + 1 spacings tried after it. Each try starts
    from the best offset so far, so the tries run one after another (each over all groups)."""
    low = x.amin(0).clamp(max=0)
    high = x.amax(0)
    flat = high == low
    sum_w, sum_x = _running_sum(w, 0), _running_sum(w * x, 0)
    inverse = _f32(nmax) / torch.where(flat, _f32(1.0), high - low)
    scale = _f32(1.0) / inverse
    levels = torch.round(inverse * (x - low)).clamp(0, nmax)
    error = _running_sum(w * _squared(scale * levels + low - x), 0)
    for step in range(steps + 1):
        factor = (_f32(rmin) + _f32(rdelta) * step) + nmax
        tried = torch.round(factor / (high - low) * (x - low)).clamp(0, nmax)
        wl = w * tried
        sum_l, sum_l2, sum_xl = _running_sum(wl, 0), _running_sum(wl * tried, 0), _running_sum(wl * x, 0)
        det = sum_w * sum_l2 - sum_l * sum_l
        fit_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        fit_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = fit_min > 0  # an offset above zero: fit the scale alone
        fit_scale = torch.where(positive, sum_xl / sum_l2, fit_scale)
        fit_min = torch.where(positive, _f32(0.0), fit_min)
        fit_error = _running_sum(w * _squared(fit_scale * tried + fit_min - x), 0)
        better = (det > 0) & (fit_error < error)
        levels = torch.where(better, tried, levels)
        scale, low, error = (torch.where(better, new, old) for new, old in
                             ((fit_scale, scale), (fit_min, low), (fit_error, error)))
    levels = torch.where(flat, _f32(0.0), levels)
    return levels, torch.where(flat, _f32(0.0), scale), -low


def _quantize_k_with_min(x: torch.Tensor, nmax: int, rmin: float, steps: int) -> tuple[torch.Tensor, ...]:
    """Super-blocks x [B, 256] -> (levels [B, 256], the 12 packed scale bytes [B, 12], d and dmin [B])."""
    blocks = len(x)
    groups = x.reshape(-1, 32).T  # [32, B * 8]
    rms = _sqrt(_running_sum(groups * groups, 0) / 32)
    weights = rms + groups.abs()
    levels, scales, mins = _fit_scale_and_min(groups, weights, nmax, rmin, 0.1, steps)
    scales, mins = scales.view(blocks, 8), mins.view(blocks, 8)
    # the largest above zero, else +0 (an all-zero group's offset is -0, which C's max starting at 0 drops)
    max_scale, max_min = (torch.where(v > 0, v, _f32(0.0)) for v in (scales.amax(1), mins.amax(1)))
    scale_levels = _six_bits(scales, max_scale)
    min_levels = _six_bits(mins, max_min)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    step = d.float()[:, None] * scale_levels
    offset = dmin.float()[:, None] * min_levels
    grouped = x.view(blocks, 8, 32)
    requantized = torch.round((grouped + offset[..., None]) / step[..., None]).clamp(0, nmax)
    levels = torch.where(step[..., None] != 0, requantized, levels.T.reshape(blocks, 8, 32))
    return (levels.reshape(blocks, 256).to(torch.int32), _pack_scales(scale_levels, min_levels),
            d.view(torch.uint8).view(-1, 2), dmin.view(torch.uint8).view(-1, 2))


def _six_bits(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """Sub-block scales (or offsets) [B, 8] as 6-bit levels of their super-block's largest, as uint8 stores them."""
    inverse = torch.where(largest > 0, _f32(63.0) / largest, _f32(0.0))
    return (torch.round(inverse[:, None] * values).to(torch.int64) % 256).clamp(max=63).to(torch.int32)


def _pack_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """6-bit scales and offsets [B, 8] -> the K-quants' 12 bytes: sub-blocks 0-3 in the low 6 bits of
    bytes 0-3 (scales) and 4-7 (offsets), 4-7's low nibbles in bytes 8-11, their top 2 bits above 0-7's."""
    packed = torch.cat([scales[:, :4] | ((scales[:, 4:] >> 4) << 6), mins[:, :4] | ((mins[:, 4:] >> 4) << 6),
                        _pack_nibbles(scales[:, 4:], mins[:, 4:])], 1)
    return packed.to(torch.uint8)


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    levels, scales, d, dmin = _quantize_k_with_min(x, 15, -1.0, 20)
    halves = levels.view(-1, 4, 2, 32)  # per 64 values: the first 32 in low nibbles, the next 32 in high
    qs = _pack_nibbles(halves[:, :, 0], halves[:, :, 1]).reshape(-1, 128).to(torch.uint8)
    return torch.cat([d, dmin, scales, qs], 1)


def _quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    levels, scales, d, dmin = _quantize_k_with_min(x, 31, -0.5, 15)
    halves = levels.view(-1, 4, 2, 32)
    qs = _pack_nibbles(halves[:, :, 0], halves[:, :, 1]).reshape(-1, 128).to(torch.uint8)
    # byte j of qh: bit 2c the 5th bit of value j of chunk c's first half, bit 2c + 1 of its second
    fifth = ((halves >> 4) & 1).permute(0, 3, 1, 2).reshape(-1, 32, 8)
    qh = (fifth * torch.tensor([1 << i for i in range(8)], dtype=torch.int32)).sum(-1).to(torch.uint8)
    return torch.cat([d, dmin, scales, qh, qs], 1)


# ---- Q6_K: a signed scale per 16 values ----------------------------------------------------------
def _fit_symmetric(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants (errors weighted by x²) for groups x [n, B]: levels [n, B] in 0..2 nmax - 1
    (level - nmax times the scale) and the scale [B], the best of 19 spacings around the largest value's."""
    largest = _first_largest_magnitude(x, 0)
    zero = largest.abs() < _GROUP_MAX_EPS
    largest = torch.where(zero, _f32(1.0), largest)
    w = x * x

    def sums(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.round(inverse[..., None, :] * x).clamp(-nmax, nmax - 1)
        return _running_sum(w * x * levels, -2), _running_sum(w * levels * levels, -2)

    inverse = _f32(-nmax) / largest
    sum_lx, sum_l2 = sums(inverse)
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, _f32(0.0))
    best = scale * sum_lx
    tries = [i for i in range(-9, 10) if i != 0]
    inverses = -(nmax + _f32(0.1) * torch.tensor(tries, dtype=torch.float32))[:, None] / largest
    all_lx, all_l2 = sums(inverses)
    for lx, l2, candidate in zip(all_lx, all_l2, inverses):  # each compared with the best so far, in order
        better = (l2 > 0) & (lx * lx > best * l2)
        inverse = torch.where(better, candidate, inverse)
        scale = torch.where(better, lx / l2, scale)
        best = torch.where(better, scale * lx, best)
    levels = torch.round(inverse * x).clamp(-nmax, nmax - 1) + nmax
    return torch.where(zero, _f32(0.0), levels), torch.where(zero, _f32(0.0), scale)


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    blocks = len(x)
    groups = x.reshape(-1, 16).T  # [16, B * 16]
    levels, scales = _fit_symmetric(groups, 32)
    levels, scales = levels.T.reshape(blocks, 16, 16), scales.view(blocks, 16)
    max_scale = _first_largest_magnitude(scales, 1)
    zero = max_scale.abs() < _GROUP_MAX_EPS
    inverse = _f32(-128.0) / torch.where(zero, _f32(1.0), max_scale)
    d = torch.where(zero, _f32(0.0), _f32(1.0) / inverse).half()
    scale_levels = torch.round(inverse[:, None] * scales).clamp(max=127)
    step = d.float()[:, None] * scale_levels
    requantized = torch.round(x.view(blocks, 16, 16) / step[..., None]).clamp(-32, 31) + 32
    levels = torch.where(step[..., None] != 0, requantized, levels).to(torch.int32).view(blocks, 2, 4, 32)
    # per 128 values: ql 64 bytes (quarters 0|2 and 1|3 as nibbles), qh 32 bytes (each quarter's top 2 bits)
    ql = torch.cat([_pack_nibbles(levels[:, :, 0], levels[:, :, 2]), _pack_nibbles(levels[:, :, 1], levels[:, :, 3])],
                   2).reshape(blocks, 128)
    top = levels >> 4
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(blocks, 64)
    out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), scale_levels.to(torch.int8).view(torch.uint8),
                     d.view(torch.uint8).view(-1, 2)], 1)
    return torch.where(zero[:, None], torch.zeros((), dtype=torch.uint8), out)


_QUANTIZERS = {Q5_0: _quantize_q5_0, Q5_1: _quantize_q5_1, Q8_0: _quantize_q8_0, Q4_K: _quantize_q4_k,
               Q5_K: _quantize_q5_k, Q6_K: _quantize_q6_k}
