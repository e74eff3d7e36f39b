// Products with weights kept in a GGUF file's own block formats (llama.cpp's ggml types Q8_0, Q4_0,
// Q5_0, Q4_K, Q5_K, Q6_K), so that a model runs with exactly the weights llama.cpp runs.
//
// A block (32 values; the K-quants' 256) has one float scale d and is read as sub-blocks of 32
// values: integer levels q, an integer scale s per 16 values (the K-quants' sub-block scales; 1
// elsewhere) and, for Q4_K and Q5_K, an offset m (their sub-block minimum): w = d * s * q - m. The
// activations are rounded to int8 with one scale dx per block of the weight's format (as llama.cpp
// pairs q8_0 with the 32-value formats and q8_K with the K-quants), so a block's sum is integer work,
//   sum_k w_k x_k = d * dx * sum_k s_k q_k xq_k - sum over sub-blocks of m * sum_k x_k,
// q times xq in one vpmaddubsw (unsigned times signed: signed levels give their magnitude, x
// carrying their sign; pairs within int16: |q| <= 128, |xq| <= 127), the integer scales in the
// vpmaddwd that adds the pairs, int32 sums over the block, then one FMA in float32; the offsets' term
// takes the sums of the rounded x per 32 (as llama.cpp's bsums), so that a product is exactly the
// dequantized weight's with the rounded x. Decoding costs a few instructions per 32 weights.

#include "ggml_blocks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace lmgen {
namespace {

enum GgmlType : int64_t { kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

constexpr int64_t kSub = 32;  // values per sub-block, and per scale of the activations
constexpr int64_t kPrefetchBytes = 1024;
constexpr int kRowsPerPass = 4;  // activation rows multiplied per pass over a weight row

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return low_nibbles(_mm256_srli_epi16(v, 4)); }
// Bits (v >> shift) & mask of each byte, moved up by 4 (the 5th and 6th bits of 5- and 6-bit levels).
inline __m256i high_bits(__m256i v, int shift, int mask) {
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(mask)), 4);
}
// Integer scales for the vpmaddwd: `first` for values 0-15 of a sub-block, `second` for 16-31.
inline __m256i scales16(int16_t first, int16_t second) {
  return _mm256_set_m128i(_mm_set1_epi16(second), _mm_set1_epi16(first));
}
// 16 values' low nibbles (values 0-15) and high nibbles (16-31), as Q4_0 and Q5_0 pack them.
inline __m256i split_nibbles(const uint8_t* p) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return low_nibbles(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
}
// Byte i: 16 where bit i of `bits` is set, else 0.
inline __m256i bits_as_16s(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i mask = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(16));
}

// The K-quants' 6-bit scales and minimums of the 8 sub-blocks, packed into 12 bytes: sub-blocks 0-3's
// in the low 6 bits of bytes 0-3 and 4-7, sub-blocks 4-7's low 4 bits in bytes 8-11 (scale low
// nibble, minimum high) and their top 2 bits in the top bits of bytes 0-3 and 4-7. Unpacked once per
// block, all at once: per sub-block, with the sub-block a variable, it was the kernel's bottleneck.
inline void scales_and_mins(const uint8_t* s, int16_t scale[8], int16_t min[8]) {
  for (int j = 0; j < 4; ++j) {
    scale[j] = s[j] & 63;
    min[j] = s[j + 4] & 63;
    scale[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    min[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// Each format: its block's values and bytes, whether its levels are unsigned and it has offsets,
// scale(block): d, and sub_blocks(block, f), which calls f(sub-block index, q, integer scales, m)
// for each sub-block of 32 values in order.
struct Q8_0 {
  static constexpr int64_t kValues = 32, kBytes = 34;
  static constexpr bool kUnsigned = false, kOffset = false;
  static float scale(const uint8_t* b) { return half_at(b); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    f(0, load32(b + 2), scales16(1, 1), 0.0f);
  }
};

struct Q4_0 {
  static constexpr int64_t kValues = 32, kBytes = 18;
  static constexpr bool kUnsigned = true, kOffset = true;  // w = d * (q - 8): levels q, offset 8 d
  static float scale(const uint8_t* b) { return half_at(b); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    f(0, split_nibbles(b + 2), scales16(1, 1), 8.0f * half_at(b));
  }
};

struct Q5_0 {
  static constexpr int64_t kValues = 32, kBytes = 22;
  static constexpr bool kUnsigned = true, kOffset = true;  // w = d * (q - 16): levels q, offset 16 d
  static float scale(const uint8_t* b) { return half_at(b); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    uint32_t fifth;
    std::memcpy(&fifth, b + 2, sizeof fifth);
    f(0, _mm256_or_si256(split_nibbles(b + 6), bits_as_16s(fifth)), scales16(1, 1), 16.0f * half_at(b));
  }
};

// Q4_K and Q5_K: d, dmin (f16), 12 bytes of scales and minimums, [Q5_K: 32 bytes of fifth bits,]
// 128 bytes of nibbles: bytes 32j..32j+31 hold sub-block 2j (low nibbles) and 2j + 1 (high).
template <bool kFifthBit>
struct QK_Nibbles {
  static constexpr int64_t kValues = 256, kBytes = kFifthBit ? 176 : 144;
  static constexpr bool kUnsigned = true, kOffset = true;
  static float scale(const uint8_t* b) { return half_at(b); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    const float dmin = half_at(b + 2);
    const uint8_t* levels = b + (kFifthBit ? 48 : 16);
    const __m256i fifth = kFifthBit ? load32(b + 16) : _mm256_setzero_si256();
    int16_t scale[8], min[8];
    scales_and_mins(b + 4, scale, min);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(levels + 32 * j);
      __m256i q[2] = {low_nibbles(v), high_nibbles(v)};
      for (int h = 0; h < 2; ++h) {
        const int sub = 2 * j + h;
        if constexpr (kFifthBit) q[h] = _mm256_or_si256(q[h], high_bits(fifth, sub, 1));
        f(sub, q[h], _mm256_set1_epi16(scale[sub]), dmin * min[sub]);
      }
    }
  }
};
using Q4_K = QK_Nibbles<false>;
using Q5_K = QK_Nibbles<true>;

// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16 values), d (f16).
// Each half of 128 values: low-nibble bytes 0-31 and 32-63 give sub-blocks 0 and 1, their high
// nibbles 2 and 3; the high pairs' byte l holds bits 0-1, 2-3, 4-5, 6-7 of sub-blocks 0-3's value l.
struct Q6_K {
  static constexpr int64_t kValues = 256, kBytes = 210;
  static constexpr bool kUnsigned = false, kOffset = false;
  static float scale(const uint8_t* b) { return half_at(b + 208); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    const auto* scales = reinterpret_cast<const int8_t*>(b + 192);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* low = b + 64 * half;
      const __m256i first = load32(low), second = load32(low + 32), pairs = load32(b + 128 + 32 * half);
      const __m256i nibbles[4] = {low_nibbles(first), low_nibbles(second), high_nibbles(first), high_nibbles(second)};
      for (int t = 0; t < 4; ++t) {
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nibbles[t], high_bits(pairs, 2 * t, 3)), _mm256_set1_epi8(32));
        const int8_t* s = scales + 8 * half + 2 * t;
        f(4 * half + t, q, scales16(s[0], s[1]), 0.0f);
      }
    }
  }
};

template <typename F>
void with_format(int64_t type, F&& body) {
  switch (type) {
    case kQ8_0: return body(Q8_0{});
    case kQ4_0: return body(Q4_0{});
    case kQ5_0: return body(Q5_0{});
    case kQ4_K: return body(Q4_K{});
    case kQ5_K: return body(Q5_K{});
    case kQ6_K: return body(Q6_K{});
    default: TORCH_CHECK(false, "lmgen's block kernels do not read ggml type ", type);
  }
}

// Activation rows [M, K] rounded to int8 in blocks of `block` values: a scale per block, and the sum
// of every 32 rounded values, scaled (the offsets' term).
struct QuantizedRows {
  int64_t K, block;
  std::vector<int8_t> values;
  std::vector<float> scales, sums;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t block) {
  QuantizedRows q{K, block, std::vector<int8_t>(M * K), std::vector<float>(M * K / block),
                  std::vector<float>(M * K / kSub)};
  for (int64_t b = 0; b < M * K / block; ++b) {
    const float* v = x + b * block;
    float top = 0.0f;
    for (int64_t i = 0; i < block; ++i) top = std::max(top, std::fabs(v[i]));
    const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
    for (int64_t i = 0; i < block; ++i) q.values[b * block + i] = static_cast<int8_t>(std::nearbyint(v[i] * inverse));
    q.scales[b] = top / 127.0f;
  }
  for (int64_t g = 0; g < M * K / kSub; ++g) {
    int32_t sum = 0;
    for (int64_t i = 0; i < kSub; ++i) sum += q.values[g * kSub + i];
    q.sums[g] = q.scales[g * kSub / block] * static_cast<float>(sum);
  }
  return q;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[m * ldy] = weight row . x row m, for the R activation rows from m0 (x in blocks of T::kValues).
template <typename T, int R>
void dot_row(const uint8_t* row, const QuantizedRows& x, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = x.K, groups = K / kSub, blocks = K / T::kValues;
  const int8_t* xq = x.values.data() + m0 * K;
  const float* dx = x.scales.data() + m0 * blocks;
  const float* sums = x.sums.data() + m0 * groups;
  __m256 acc[R];
  float offsets[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offsets[r] = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * T::kBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    T::sub_blocks(block, [&](int sub, __m256i q, __m256i scales, float m) {
      const int64_t g = b * (T::kValues / kSub) + sub;
      const __m256i magnitude = T::kUnsigned ? q : _mm256_sign_epi8(q, q);
      for (int r = 0; r < R; ++r) {
        const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + g * kSub));
        const __m256i signed_x = T::kUnsigned ? xr : _mm256_sign_epi8(xr, q);
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), scales));
        if constexpr (T::kOffset) offsets[r] += m * sums[r * groups + g];
      }
    });
    const float d = T::scale(block);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(d * dx[r * blocks + b]), acc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = horizontal_sum(acc[r]) - offsets[r];
}

// Output rows [n0, n1) of one part (its rows from `rows`, `stride` bytes apart) into y [M, ldy].
template <typename T>
void product_rows(const uint8_t* rows, int64_t stride, const QuantizedRows& x, int64_t M, int64_t n0, int64_t n1,
                  float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = rows + n * stride;
    int64_t m = 0;
    for (; m + kRowsPerPass <= M; m += kRowsPerPass) dot_row<T, kRowsPerPass>(row, x, m, y + m * ldy + n, ldy);
    for (; m < M; ++m) dot_row<T, 1>(row, x, m, y + m * ldy + n, ldy);
  }
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t K, const char* op) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.is_cpu(), op,
              ": the blocks must be a contiguous uint8 matrix on the CPU");
  with_format(type, [&](auto format) {
    using T = decltype(format);
    TORCH_CHECK(K % T::kValues == 0 && K / T::kValues * T::kBytes <= blocks.size(1), op, ": rows of ", K,
                " values of ggml type ", type, " do not fit rows of ", blocks.size(1), " bytes");
  });
}

at::Tensor dequantize_blocks(const at::Tensor& blocks, int64_t type, int64_t K) {
  check_blocks(blocks, type, K, "dequantize_blocks");
  const int64_t N = blocks.size(0), stride = blocks.size(1);
  at::Tensor out = at::empty({N, K}, blocks.options().dtype(at::kFloat));
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_format(type, [&](auto format) {
    using T = decltype(format);
    parallel_output_rows(N, [&](int64_t n0, int64_t n1) {
      alignas(32) int8_t q[kSub];
      alignas(32) int16_t s[16];
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t b = 0; b < K / T::kValues; ++b) {
          const uint8_t* block = bp + n * stride + b * T::kBytes;
          const float d = T::scale(block);
          T::sub_blocks(block, [&](int sub, __m256i levels, __m256i scales, float m) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(q), levels);
            _mm256_store_si256(reinterpret_cast<__m256i*>(s), scales);
            float* w = op + n * K + b * T::kValues + sub * kSub;
            for (int i = 0; i < kSub; ++i) w[i] = d * static_cast<float>(s[i / 2] * q[i]) - m;
          });
        }
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor gemv_blocks(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& layout) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), "gemv_blocks: x must be a float matrix");
  TORCH_CHECK(layout.dim() == 2 && layout.size(1) == 2 && layout.scalar_type() == at::kLong && layout.is_contiguous(),
              "gemv_blocks: the layout must be int64 [parts, 2] of (ggml type, rows)");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0), stride = blocks.size(1);
  TORCH_CHECK(K % kSub == 0, "gemv_blocks: in_features must be a multiple of 32, got ", K);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  std::optional<QuantizedRows> by_block[2];  // x in blocks of 32 and of 256, made when a part needs them
  at::Tensor y = at::empty({M, N}, xf.options());
  float* yp = y.data_ptr<float>();
  const int64_t* parts = layout.data_ptr<int64_t>();
  int64_t first = 0;
  for (int64_t p = 0; p < layout.size(0); ++p) {
    const int64_t type = parts[2 * p], rows = parts[2 * p + 1];
    TORCH_CHECK(rows >= 0 && first + rows <= N, "gemv_blocks: the layout's rows exceed the blocks' ", N);
    check_blocks(blocks, type, K, "gemv_blocks");
    const uint8_t* part = blocks.data_ptr<uint8_t>() + first * stride;
    with_format(type, [&](auto format) {
      using T = decltype(format);
      std::optional<QuantizedRows>& xq = by_block[T::kValues == 256];
      if (!xq) xq = quantize_rows(xf.data_ptr<float>(), M, K, T::kValues);
      parallel_output_rows(rows, [&](int64_t n0, int64_t n1) { product_rows<T>(part, stride, *xq, M, n0, n1, yp + first, N); });
    });
    first += rows;
  }
  TORCH_CHECK(first == N, "gemv_blocks: the layout covers ", first, " rows of the blocks' ", N);
  return y.to(x.scalar_type());
}

}  // namespace lmgen

TORCH_LIBRARY_FRAGMENT(lmgen, m) {
  m.def("gemv_blocks(Tensor x, Tensor blocks, Tensor layout) -> Tensor");
  m.def("dequantize_blocks(Tensor blocks, int ggml_type, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmgen, CPU, m) {
  m.impl("gemv_blocks", &lmgen::gemv_blocks);
  m.impl("dequantize_blocks", &lmgen::dequantize_blocks);
}
