// Float weights quantized into GGUF block formats as llama.cpp's reference quantizers do (llama-quantize
// without an importance matrix): Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, byte for byte, so that a float
// checkpoint quantized while loading (quantization="q4_k_m": lmgen/layers/ggml_recipes.py) holds the
// blocks of the GGUF file llama.cpp would make from it (the layouts: ggml_blocks.cpp).
//
// The searches are llama.cpp's: Q4_K and Q5_K fit a scale and an offset to each 32 values by trying a
// range of grid spacings and keeping the one of least weighted squared error (the weights favour large
// values), then quantize a super-block's 8 scales and 8 offsets to 6 bits and requantize its values on
// that grid; Q6_K tries 19 spacings per 16 values for a symmetric grid weighted by the values' squares,
// then int8 scales; the 32-value formats take their scale from the largest magnitude (Q8_0, Q5_0) or
// the range (Q5_1).
//
// The bytes are llama.cpp's only if every float32 operation is its C code's, in the same order: sums add
// one term after another (the compiler reorders no float sum without -ffast-math, and the build's
// -ffp-contract=off keeps a * b + c two roundings), rounding is nearest_int's (half to even) where
// llama.cpp's is and roundf's (half away from zero) or a cast's (toward zero) where those are, and
// scales are stored as float16 rounded to nearest even. The K-quants' searches, most of the work, run a
// super-block's groups side by side in AVX2 lanes, each lane the C code's steps (6x and 4x faster than
// one group at a time); rows are independent, so threads take ranges of rows. tests/layers/
// test_ggml_recipes.py checks the bytes against llama.cpp's recorded ones.

#include "ggml_blocks.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lmgen {
namespace {

constexpr float kGroupMaxEps = 1e-15f;  // ggml's: a group whose largest magnitude is below this is all zeros

// ggml's nearest_int: adding 1.5 * 2^23 leaves the rounded value (half to even) in the mantissa. Beyond
// 2^22 in magnitude (a spacing the Q4_K search can try) it gives what the C code gives, clamped after.
inline int nearest_int(float v) { return (std::bit_cast<int32_t>(v + 12582912.0f) & 0x007FFFFF) - 0x00400000; }

inline int clamp_level(int level, int low, int high) { return std::max(low, std::min(high, level)); }

// Stores v at p as float16 (rounded to nearest even); the value stored, as a float.
inline float store_half(uint8_t* p, float v) {
  const uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(p, &h, sizeof h);
  return _cvtsh_ss(h);
}

// The value of largest magnitude among x[0..n), the first of a tie (C's strict >); 0 if all are 0.
inline float largest_magnitude(const float* x, int n) {
  float top = 0.0f, largest = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > top) top = std::fabs(x[i]), largest = x[i];
  }
  return largest;
}

// ---- AVX2 vectors, lane by lane as the scalar code ------------------------------------------------------

using F8 = __m256;

inline F8 splat(float v) { return _mm256_set1_ps(v); }
inline F8 add(F8 a, F8 b) { return _mm256_add_ps(a, b); }
inline F8 sub(F8 a, F8 b) { return _mm256_sub_ps(a, b); }
inline F8 mul(F8 a, F8 b) { return _mm256_mul_ps(a, b); }
inline F8 div(F8 a, F8 b) { return _mm256_div_ps(a, b); }
inline F8 pick(F8 mask, F8 if_set, F8 otherwise) { return _mm256_blendv_ps(otherwise, if_set, mask); }
inline F8 greater(F8 a, F8 b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline F8 magnitude(F8 a) { return _mm256_andnot_ps(splat(-0.0f), a); }

// nearest_int lane by lane, clamped to [low, high], as a float.
inline F8 levels_at(F8 v, int low, int high) {
  const __m256i mantissa =
      _mm256_and_si256(_mm256_castps_si256(add(v, splat(12582912.0f))), _mm256_set1_epi32(0x007FFFFF));
  const __m256i level = _mm256_sub_epi32(mantissa, _mm256_set1_epi32(0x00400000));
  return _mm256_cvtepi32_ps(_mm256_max_epi32(_mm256_set1_epi32(low), _mm256_min_epi32(_mm256_set1_epi32(high), level)));
}

// Round half away from zero (roundf): the truncation, one further where the part cut off is 1/2 or more
// (v - trunc(v) is exact).
inline F8 round_half_away(F8 v) {
  const F8 truncated = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const F8 half_or_more = _mm256_cmp_ps(magnitude(sub(v, truncated)), splat(0.5f), _CMP_GE_OQ);
  return add(truncated, _mm256_and_ps(half_or_more, _mm256_or_ps(splat(1.0f), _mm256_and_ps(v, splat(-0.0f)))));
}

// The largest magnitude among 32 values (a maximum: the order it is taken in cannot change it).
inline float top_magnitude(const float* x) {
  F8 top = magnitude(_mm256_loadu_ps(x));
  for (int k = 1; k < 4; ++k) top = _mm256_max_ps(top, magnitude(_mm256_loadu_ps(x + 8 * k)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// ---- the 32-value formats ----------------------------------------------------------------------------

void quantize_q8_0(const float* x, uint8_t* out) {
  const float d = top_magnitude(x) / 127;
  const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
  store_half(out, d);
  alignas(32) int32_t levels[32];
  for (int k = 0; k < 4; ++k) {
    const __m256i rounded = _mm256_cvtps_epi32(round_half_away(mul(_mm256_loadu_ps(x + 8 * k), splat(inverse))));
    _mm256_store_si256(reinterpret_cast<__m256i*>(levels + 8 * k), rounded);
  }
  for (int i = 0; i < 32; ++i) out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(levels[i]));
}

// 5-bit levels as Q5_0 and Q5_1 store them after their scales: the 5th bits as a little-endian uint32
// (bit j: value j), then values j and j + 16 in the low and high nibbles of byte j.
void put_five_bit_levels(const int32_t levels[32], uint8_t* out) {
  uint32_t fifth = 0;
  for (int j = 0; j < 32; ++j) fifth |= static_cast<uint32_t>((levels[j] >> 4) & 1) << j;
  std::memcpy(out, &fifth, sizeof fifth);
  for (int j = 0; j < 16; ++j) out[4 + j] = (levels[j] & 0x0F) | ((levels[j + 16] & 0x0F) << 4);
}

void quantize_q5_0(const float* x, uint8_t* out) {
  // the value of largest magnitude, the first of a tie (C's strict >); +0 in an all-zero block
  const float top = top_magnitude(x);
  const float largest = top > 0 ? *std::find_if(x, x + 32, [top](float v) { return std::fabs(v) == top; }) : 0.0f;
  const float d = largest / -16;
  const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
  store_half(out, d);
  alignas(32) int32_t levels[32];
  for (int k = 0; k < 4; ++k) {  // truncated as C's (int8_t) cast, at most 31
    const F8 shifted = add(mul(_mm256_loadu_ps(x + 8 * k), splat(inverse)), splat(16.5f));
    _mm256_store_si256(reinterpret_cast<__m256i*>(levels + 8 * k),
                       _mm256_min_epi32(_mm256_cvttps_epi32(shifted), _mm256_set1_epi32(31)));
  }
  put_five_bit_levels(levels, out + 2);
}

// Scalar: its minimum's sign (-0 or +0, stored) depends on the order the values are compared in.
void quantize_q5_1(const float* x, uint8_t* out) {
  float low = FLT_MAX, high = -FLT_MAX;
  for (int i = 0; i < 32; ++i) low = std::min(low, x[i]), high = std::max(high, x[i]);
  const float d = (high - low) / 31;
  const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
  store_half(out, d);
  store_half(out + 2, low);
  int32_t levels[32];
  for (int i = 0; i < 32; ++i) levels[i] = static_cast<uint8_t>((x[i] - low) * inverse + 0.5f);
  put_five_bit_levels(levels, out + 4);
}

// ---- the K-quants' searches, 8 groups at a time -------------------------------------------------------
// Each group's search is a chain of float32 steps whose order fixes the bytes, so it cannot be split; but
// the 8 sub-blocks of a super-block (16 for Q6_K, in two passes) search side by side, group g in lane g of
// AVX2 vectors, every operation the scalar code's, lane by lane (a comparison the C code makes with > or
// <, or a blend where it branches).

// Groups of n values side by side: t[i] holds value i of groups 0-7 (group g starting at x + g * n).
template <int n>
void side_by_side(const float* x, F8 t[n]) {
  alignas(32) float lanes[8];
  for (int i = 0; i < n; ++i) {
    for (int g = 0; g < 8; ++g) lanes[g] = x[g * n + i];
    t[i] = _mm256_load_ps(lanes);
  }
}

template <int n>
void store_levels(const F8 t[n], uint8_t* levels) {  // group g's level i at levels[g * n + i]
  alignas(32) float lanes[8];
  for (int i = 0; i < n; ++i) {
    _mm256_store_ps(lanes, t[i]);
    for (int g = 0; g < 8; ++g) levels[g * n + i] = static_cast<uint8_t>(lanes[g]);
  }
}

// ---- Q4_K and Q5_K: a scale and an offset per 32 values ------------------------------------------------

// llama.cpp's make_qkx2_quants for 8 groups of 32 values x (side by side) with error weights w: levels in
// 0..nmax, the scale and the offset (x ≈ scale * level - offset) of least weighted squared error among the
// range's own grid and the steps + 1 spacings tried after it, each from the best offset so far.
void fit_scales_and_offsets(const F8 x[32], const F8 w[32], int nmax, float rmin, int steps, F8 levels[32], F8* scale,
                            F8* offset) {
  constexpr float kDelta = 0.1f;  // between the spacings tried
  F8 low = x[0], high = x[0], sum_w = w[0], sum_x = mul(sum_w, x[0]);
  for (int i = 1; i < 32; ++i) {
    low = _mm256_min_ps(x[i], low), high = _mm256_max_ps(x[i], high);  // the C code's x < low ? x : low
    sum_w = add(sum_w, w[i]);
    sum_x = add(sum_x, mul(w[i], x[i]));
  }
  low = _mm256_min_ps(splat(0.0f), low);  // 0 where low > 0 (a -0 stays)
  const F8 flat = _mm256_cmp_ps(high, low, _CMP_EQ_OQ), flat_offset = _mm256_xor_ps(low, splat(-0.0f));
  const F8 inverse = div(splat(static_cast<float>(nmax)), sub(high, low));
  F8 best = splat(0.0f);
  *scale = div(splat(1.0f), inverse);
  for (int i = 0; i < 32; ++i) {
    levels[i] = levels_at(mul(inverse, sub(x[i], low)), 0, nmax);
    const F8 diff = sub(add(mul(*scale, levels[i]), low), x[i]);
    best = add(best, mul(w[i], mul(diff, diff)));
  }
  F8 tried[32];
  for (int step = 0; step <= steps; ++step) {
    const F8 spacing = div(splat(rmin + kDelta * step + nmax), sub(high, low));
    F8 sum_l = splat(0.0f), sum_l2 = sum_l, sum_xl = sum_l;
    for (int i = 0; i < 32; ++i) {
      tried[i] = levels_at(mul(spacing, sub(x[i], low)), 0, nmax);
      const F8 wl = mul(w[i], tried[i]);
      sum_l = add(sum_l, wl);
      sum_l2 = add(sum_l2, mul(wl, tried[i]));
      sum_xl = add(sum_xl, mul(wl, x[i]));
    }
    const F8 det = sub(mul(sum_w, sum_l2), mul(sum_l, sum_l));
    F8 fit_scale = div(sub(mul(sum_w, sum_xl), mul(sum_x, sum_l)), det);
    F8 fit_low = div(sub(mul(sum_l2, sum_x), mul(sum_l, sum_xl)), det);
    const F8 positive = greater(fit_low, splat(0.0f));  // an offset above zero: fit the scale alone
    fit_scale = pick(positive, div(sum_xl, sum_l2), fit_scale);
    fit_low = pick(positive, splat(0.0f), fit_low);
    F8 error = splat(0.0f);
    for (int i = 0; i < 32; ++i) {
      const F8 diff = sub(add(mul(fit_scale, tried[i]), fit_low), x[i]);
      error = add(error, mul(w[i], mul(diff, diff)));
    }
    const F8 better = _mm256_and_ps(greater(det, splat(0.0f)), _mm256_cmp_ps(error, best, _CMP_LT_OQ));
    for (int i = 0; i < 32; ++i) levels[i] = pick(better, tried[i], levels[i]);
    best = pick(better, error, best), *scale = pick(better, fit_scale, *scale), low = pick(better, fit_low, low);
  }
  for (int i = 0; i < 32; ++i) levels[i] = pick(flat, splat(0.0f), levels[i]);
  *scale = pick(flat, splat(0.0f), *scale);
  *offset = pick(flat, flat_offset, _mm256_xor_ps(low, splat(-0.0f)));
}

// Sub-block scales (or offsets) as 6-bit levels of their super-block's largest; the float the block stores.
float six_bit_levels(const float values[8], uint8_t levels[8]) {
  float largest = 0;
  for (int j = 0; j < 8; ++j) largest = values[j] > largest ? values[j] : largest;
  const float inverse = largest > 0 ? 63.f / largest : 0.f;
  for (int j = 0; j < 8; ++j) levels[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inverse * values[j])));
  return largest / 63.f;
}

// Q4_K (nmax 15) and Q5_K (31): d, dmin (float16), the 12 bytes of 6-bit scales and offsets (unpacked by
// ggml_blocks.cpp's scales_and_mins), then [Q5_K: 32 bytes of 5th bits,] 128 bytes of low nibbles.
template <int kNmax>
void quantize_k_with_offsets(const float* x, uint8_t* out, float rmin, int steps) {
  F8 group[32], weights[32], fitted[32], scale, offset;
  side_by_side<32>(x, group);
  F8 sum_x2 = splat(0.0f);
  for (int i = 0; i < 32; ++i) sum_x2 = add(sum_x2, mul(group[i], group[i]));
  const F8 rms = _mm256_sqrt_ps(div(sum_x2, splat(32.0f)));
  for (int i = 0; i < 32; ++i) weights[i] = add(rms, magnitude(group[i]));
  fit_scales_and_offsets(group, weights, kNmax, rmin, steps, fitted, &scale, &offset);
  uint8_t levels[256], scale_levels[8], offset_levels[8];
  store_levels<32>(fitted, levels);
  alignas(32) float scales[8], offsets[8];
  _mm256_store_ps(scales, scale);
  _mm256_store_ps(offsets, offset);
  const float d = store_half(out, six_bit_levels(scales, scale_levels));
  const float dmin = store_half(out + 2, six_bit_levels(offsets, offset_levels));
  uint8_t* packed = out + 4;
  for (int j = 0; j < 4; ++j) {
    packed[j] = scale_levels[j] | ((scale_levels[j + 4] >> 4) << 6);
    packed[j + 4] = offset_levels[j] | ((offset_levels[j + 4] >> 4) << 6);
    packed[j + 8] = (scale_levels[j + 4] & 0x0F) | ((offset_levels[j + 4] & 0x0F) << 4);
  }
  for (int j = 0; j < 8; ++j) {  // the values on the grid the quantized scale and offset give
    const float step = d * scale_levels[j];
    if (step == 0) continue;
    const float shift = dmin * offset_levels[j];
    for (int i = 0; i < 32; ++i) {
      levels[32 * j + i] = clamp_level(nearest_int((x[32 * j + i] + shift) / step), 0, kNmax);
    }
  }
  uint8_t* nibbles = out + (kNmax > 15 ? 48 : 16);
  if constexpr (kNmax > 15) std::memset(out + 16, 0, 32);
  for (int c = 0; c < 4; ++c) {  // per 64 values: the first 32 in low nibbles, the next 32 in high
    for (int i = 0; i < 32; ++i) {
      const uint8_t first = levels[64 * c + i], second = levels[64 * c + 32 + i];
      nibbles[32 * c + i] = (first & 0x0F) | ((second & 0x0F) << 4);
      if constexpr (kNmax > 15) out[16 + i] |= ((first >> 4) << (2 * c)) | ((second >> 4) << (2 * c + 1));
    }
  }
}

void quantize_q4_k(const float* x, uint8_t* out) { quantize_k_with_offsets<15>(x, out, -1.0f, 20); }
void quantize_q5_k(const float* x, uint8_t* out) { quantize_k_with_offsets<31>(x, out, -0.5f, 15); }

// ---- Q6_K: a signed scale per 16 values ----------------------------------------------------------------

// The groups' levels in -nmax..nmax-1 at spacings 1 / inverse, and their sums weighted by x² (make_qx_quants').
void symmetric_sums(const F8 x[16], int nmax, F8 inverse, F8* sum_lx, F8* sum_l2) {
  *sum_lx = *sum_l2 = splat(0.0f);
  for (int i = 0; i < 16; ++i) {
    const F8 l = levels_at(mul(inverse, x[i]), -nmax, nmax - 1), w = mul(x[i], x[i]);
    *sum_lx = add(*sum_lx, mul(mul(w, x[i]), l));
    *sum_l2 = add(*sum_l2, mul(mul(w, l), l));
  }
}

// llama.cpp's make_qx_quants for 8 groups of 16 values x (side by side; errors weighted by x²): levels in
// 0..2 nmax - 1 (level - nmax times the scale) and the scale, the best of the largest value's spacing and
// 18 around it.
void fit_symmetric(const F8 x[16], int nmax, F8 levels[16], F8* scale) {
  F8 top = splat(0.0f), largest = top;  // the value of largest magnitude, the first of a tie
  for (int i = 0; i < 16; ++i) {
    const F8 larger = greater(magnitude(x[i]), top);
    top = pick(larger, magnitude(x[i]), top), largest = pick(larger, x[i], largest);
  }
  const F8 zero = _mm256_cmp_ps(top, splat(kGroupMaxEps), _CMP_LT_OQ);
  F8 inverse = div(splat(static_cast<float>(-nmax)), largest), sum_lx, sum_l2;
  symmetric_sums(x, nmax, inverse, &sum_lx, &sum_l2);
  *scale = pick(_mm256_cmp_ps(sum_l2, splat(0.0f), _CMP_NEQ_UQ), div(sum_lx, sum_l2), splat(0.0f));
  F8 best = mul(*scale, sum_lx);
  for (int is = -9; is <= 9; ++is) {  // each against the best so far, in order
    if (is == 0) continue;
    const F8 candidate = div(splat(-(nmax + 0.1f * is)), largest);
    symmetric_sums(x, nmax, candidate, &sum_lx, &sum_l2);
    const F8 better = _mm256_and_ps(greater(sum_l2, splat(0.0f)), greater(mul(sum_lx, sum_lx), mul(best, sum_l2)));
    inverse = pick(better, candidate, inverse), *scale = pick(better, div(sum_lx, sum_l2), *scale);
    best = pick(better, mul(*scale, sum_lx), best);
  }
  for (int i = 0; i < 16; ++i) {
    const F8 level = add(splat(static_cast<float>(nmax)), levels_at(mul(inverse, x[i]), -nmax, nmax - 1));
    levels[i] = pick(zero, splat(0.0f), level);
  }
  *scale = pick(zero, splat(0.0f), *scale);
}

// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (float16); an all-zero block
// when every scale is ~0 (the layout: ggml_blocks.cpp's Q6_K).
void quantize_q6_k(const float* x, uint8_t* out) {
  uint8_t levels[256];
  alignas(32) float scales[16];
  for (int half = 0; half < 2; ++half) {
    F8 groups[16], fitted[16], scale;
    side_by_side<16>(x + 128 * half, groups);
    fit_symmetric(groups, 32, fitted, &scale);
    store_levels<16>(fitted, levels + 128 * half);
    _mm256_store_ps(scales + 8 * half, scale);
  }
  const float max_scale = largest_magnitude(scales, 16);
  if (std::fabs(max_scale) < kGroupMaxEps) {
    std::memset(out, 0, 210);
    return;
  }
  const float inverse = -128.f / max_scale;
  const float d = store_half(out + 208, 1 / inverse);
  auto* scale_levels = reinterpret_cast<int8_t*>(out + 192);
  for (int j = 0; j < 16; ++j) scale_levels[j] = static_cast<int8_t>(std::min(127, nearest_int(inverse * scales[j])));
  for (int j = 0; j < 16; ++j) {  // the values on the grid the quantized scale gives
    const float step = d * scale_levels[j];
    if (step == 0) continue;
    for (int i = 0; i < 16; ++i) levels[16 * j + i] = clamp_level(nearest_int(x[16 * j + i] / step), -32, 31) + 32;
  }
  for (int half = 0; half < 2; ++half) {  // per 128 values: quarters 0|2 and 1|3 as nibbles, each's top 2 bits
    const uint8_t* l = levels + 128 * half;
    uint8_t* low = out + 64 * half;
    uint8_t* high = out + 128 + 32 * half;
    for (int i = 0; i < 32; ++i) {
      low[i] = (l[i] & 0x0F) | ((l[i + 64] & 0x0F) << 4);
      low[i + 32] = (l[i + 32] & 0x0F) | ((l[i + 96] & 0x0F) << 4);
      high[i] = (l[i] >> 4) | ((l[i + 32] >> 4) << 2) | ((l[i + 64] >> 4) << 4) | ((l[i + 96] >> 4) << 6);
    }
  }
}

struct Quantizer {
  int64_t values, bytes;  // of a block
  void (*block)(const float*, uint8_t*);
};

Quantizer quantizer(int64_t type) {
  switch (type) {
    case 6: return {32, 22, quantize_q5_0};
    case 7: return {32, 24, quantize_q5_1};
    case 8: return {32, 34, quantize_q8_0};
    case 12: return {256, 144, quantize_q4_k};
    case 13: return {256, 176, quantize_q5_k};
    case 14: return {256, 210, quantize_q6_k};
    default: TORCH_CHECK(false, "quantize_blocks: lmgen quantizes to ggml types 6-8 and 12-14 (Q5_0, Q5_1, Q8_0, ",
                         "Q4_K, Q5_K, Q6_K), not ", type);
  }
}

// Row n of x [N, K] in float32: x's own, or widened (half precision exactly) into `buffer`, a thread's own row
// (converting the whole weight first cost more than quantizing it to Q5_0 or Q8_0).
template <typename T>
const float* float_row(const T* x, int64_t K, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return x + n * K;
  } else {
    buffer.resize(K);
    std::transform(x + n * K, x + (n + 1) * K, buffer.begin(), [](T v) { return static_cast<float>(v); });
    return buffer.data();
  }
}

// weight [N, K] (any float dtype) -> its rows as `type` blocks, into the first K / values * bytes of each row
// of out (uint8 [N, at least that]: a padded row's padding is left as it is).
void quantize_blocks(const at::Tensor& weight, int64_t type, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 2 && at::isFloatingType(weight.scalar_type()) && weight.is_cpu(),
              "quantize_blocks: the weight must be a float matrix on the CPU");
  const Quantizer q = quantizer(type);
  const int64_t N = weight.size(0), K = weight.size(1), row_bytes = K / q.values * q.bytes;
  TORCH_CHECK(K % q.values == 0, "quantize_blocks: rows of ", K, " values are no whole blocks of ", q.values,
              " (ggml type ", type, ")");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kByte && out.is_cpu() && out.size(0) == N &&
                  out.size(1) >= row_bytes && out.stride(1) == 1,
              "quantize_blocks: out must be uint8 [", N, ", at least ", row_bytes, "] on the CPU, rows contiguous");
  const at::Tensor x = weight.contiguous();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t stride = out.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_blocks", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    parallel_output_rows(N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<float> buffer;
      for (int64_t n = n0; n < n1; ++n) {
        const float* row = float_row(xp, K, n, buffer);
        for (int64_t b = 0; b < K / q.values; ++b) q.block(row + b * q.values, op + n * stride + b * q.bytes);
      }
    });
  });
}

}  // namespace
}  // namespace lmgen

TORCH_LIBRARY_FRAGMENT(lmgen, m) { m.def("quantize_blocks(Tensor weight, int ggml_type, Tensor(a!) out) -> ()"); }

TORCH_LIBRARY_IMPL(lmgen, CPU, m) { m.impl("quantize_blocks", &lmgen::quantize_blocks); }
