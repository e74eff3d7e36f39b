// What cpu.cpp and ggml_blocks.cpp (one library) take from each other.
#pragma once

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <functional>

namespace lmgen {

// The sum of 8 int32 lanes.
inline int32_t lane_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// x's 4 int8 values at p in every 32-bit lane (one broadcast load).
inline __m256i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, sizeof four);
  return _mm256_set1_epi32(four);
}

// 32 floats times `inverse`, rounded to the nearest integer (even on ties, as lrintf) as int8, how both
// libraries' integer kernels round activations. Adds the integers to `sum`.
inline __m256i round_to_int8(const float* x, __m256 inverse, __m256i& sum) {
  __m256i v[4];
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), inverse));
    sum = _mm256_add_epi32(sum, v[i]);
  }
  // the packs interleave 128-bit lanes: columns 0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// body(first, last) over output rows [0, n), one contiguous range per thread, each a multiple of `unit`
// rows (n one too): on the threads of a running decode_layers call (its crew), else on PyTorch's (cpu.cpp).
void parallel_output_rows(int64_t n, int64_t unit, const std::function<void(int64_t, int64_t)>& body);

// x [M, K] times a weight stored in GGUF blocks (ggml_blocks.cpp): blocks uint8 [N, row stride],
// layout int64 [parts, 2] of (ggml type, rows), the parts' rows stacked in order.
at::Tensor gemv_blocks(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& layout);

}  // namespace lmgen
