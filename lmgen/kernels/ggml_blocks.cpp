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
// vpmaddwd that adds the pairs, int32 sums over the block, then one FMA in float32. The offsets' term
// is integer work too: each sub-block's offset level (8 or 16 for Q4_0 and Q5_0, the K-quants' 6-bit
// minimums) times the integer sum of its 32 rounded x (as llama.cpp's bsums), summed over the block,
// scaled once a block (d for Q4_0 and Q5_0, folded into the block's integer sum; dmin for the K-quants),
// so that a product is exactly the dequantized weight's with the rounded x. Decoding costs a few
// instructions per 32 weights (a float multiply-add per sub-block for the offsets, which chained one
// after another, cost Q5_0 and Q4_K a tenth of their speed).

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
// in the low 6 bits of bytes 0-3 (scales) and 4-7 (minimums), sub-blocks 4-7's low 4 bits in bytes
// 8-11 (scale low nibble, minimum high) and their top 2 bits in the top bits of bytes 0-3 and 4-7.
// Unpacked once per block, all at once: per sub-block, with the sub-block a variable, it was the
// kernel's bottleneck. `minimums`: the minimums (bytes 4-7 and the high nibbles) instead of the scales.
inline void six_bit_values(const uint8_t* s, bool minimums, int16_t out[8]) {
  const uint8_t* low = s + (minimums ? 4 : 0);
  for (int j = 0; j < 4; ++j) {
    out[j] = low[j] & 63;
    out[j + 4] = ((s[j + 8] >> (minimums ? 4 : 0)) & 0x0F) | ((low[j] >> 6) << 4);
  }
}

// Each format: its block's values and bytes, whether its levels are unsigned, scale(block): d,
// sub_blocks(block, f), which calls f(sub-block index, q, integer scales) for each sub-block of 32
// values in order, and where it has offsets (w = d * s * q - offset_scale * offset level),
// offset_levels(block, levels): each sub-block's, and offset_scale(block).
struct Q8_0 {
  static constexpr int64_t kValues = 32, kBytes = 34;
  static constexpr bool kUnsigned = false, kOffset = false;
  static float scale(const uint8_t* b) { return half_at(b); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    f(0, load32(b + 2), scales16(1, 1));
  }
};

struct Q4_0 {
  static constexpr int64_t kValues = 32, kBytes = 18;
  static constexpr bool kUnsigned = true, kOffset = true;  // w = d * (q - 8): levels q, offset 8 d
  static float scale(const uint8_t* b) { return half_at(b); }
  static float offset_scale(const uint8_t* b) { return half_at(b); }
  static void offset_levels(const uint8_t*, int16_t levels[1]) { levels[0] = 8; }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    f(0, split_nibbles(b + 2), scales16(1, 1));
  }
};

struct Q5_0 {
  static constexpr int64_t kValues = 32, kBytes = 22;
  static constexpr bool kUnsigned = true, kOffset = true;  // w = d * (q - 16): levels q, offset 16 d
  static float scale(const uint8_t* b) { return half_at(b); }
  static float offset_scale(const uint8_t* b) { return half_at(b); }
  static void offset_levels(const uint8_t*, int16_t levels[1]) { levels[0] = 16; }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    uint32_t fifth;
    std::memcpy(&fifth, b + 2, sizeof fifth);
    f(0, _mm256_or_si256(split_nibbles(b + 6), bits_as_16s(fifth)), scales16(1, 1));
  }
};

// Q4_K and Q5_K: d, dmin (f16), 12 bytes of scales and minimums, [Q5_K: 32 bytes of fifth bits,]
// 128 bytes of nibbles: bytes 32j..32j+31 hold sub-block 2j (low nibbles) and 2j + 1 (high).
template <bool kFifthBit>
struct QK_Nibbles {
  static constexpr int64_t kValues = 256, kBytes = kFifthBit ? 176 : 144;
  static constexpr bool kUnsigned = true, kOffset = true;
  static float scale(const uint8_t* b) { return half_at(b); }
  static float offset_scale(const uint8_t* b) { return half_at(b + 2); }  // dmin
  static void offset_levels(const uint8_t* b, int16_t levels[8]) { six_bit_values(b + 4, true, levels); }
  template <typename F>
  static void sub_blocks(const uint8_t* b, F&& f) {
    const uint8_t* levels = b + (kFifthBit ? 48 : 16);
    const __m256i fifth = kFifthBit ? load32(b + 16) : _mm256_setzero_si256();
    int16_t scale[8];
    six_bit_values(b + 4, false, scale);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(levels + 32 * j);
      __m256i q[2] = {low_nibbles(v), high_nibbles(v)};
      for (int h = 0; h < 2; ++h) {
        const int sub = 2 * j + h;
        if constexpr (kFifthBit) q[h] = _mm256_or_si256(q[h], high_bits(fifth, sub, 1));
        f(sub, q[h], _mm256_set1_epi16(scale[sub]));
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
        f(4 * half + t, q, scales16(s[0], s[1]));
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
// of every 32 rounded values and of every 16 (the offsets' terms; |sum| <= 32 * 127 fits int16).
struct QuantizedRows {
  int64_t K;
  std::vector<int8_t> values;
  std::vector<float> scales;
  std::vector<int16_t> sums, half_sums;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t block) {
  QuantizedRows q{K, std::vector<int8_t>(M * K), std::vector<float>(M * K / block),
                  std::vector<int16_t>(M * K / kSub), std::vector<int16_t>(M * K / 16)};
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < M * K / block; ++b) {
    const float* v = x + b * block;
    __m256 largest = _mm256_setzero_ps();
    for (int64_t i = 0; i < block; i += 8) largest = _mm256_max_ps(largest, _mm256_and_ps(_mm256_loadu_ps(v + i), magnitude));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, largest);
    const float top = *std::max_element(lanes, lanes + 8);
    const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    for (int64_t i = 0; i < block; i += kSub) {
      __m256i sum = _mm256_setzero_si256();
      const __m256i rounded = round_to_int8(v + i, inverse, sum);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.values.data() + b * block + i), rounded);
      const int64_t g = (b * block + i) / kSub;
      q.sums[g] = static_cast<int16_t>(lane_sum(sum));
      // sums of 4 consecutive values; the first 16's in the low half
      const __m256i fours = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), rounded), _mm256_set1_epi16(1));
      q.half_sums[2 * g] = static_cast<int16_t>(lane_sum(_mm256_permute2x128_si256(fours, fours, 0x80)));
      q.half_sums[2 * g + 1] = static_cast<int16_t>(q.sums[g] - q.half_sums[2 * g]);
    }
    q.scales[b] = top / 127.0f;
  }
  return q;
}

// Sum over a block's sub-blocks of offset level times the sub-block's sum of rounded x.
template <int64_t kSubs>
inline int32_t offset_sum(const int16_t (&levels)[kSubs], const int16_t* sums) {
  if constexpr (kSubs == 1) {
    return levels[0] * sums[0];
  } else {
    static_assert(kSubs == 8, "K-quant blocks have 8 sub-blocks");
    __m128i s = _mm_madd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(levels)),
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(sums)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[m * ldy] = weight row . x row m, for the R activation rows from m0 (x in blocks of T::kValues).
template <typename T, int R>
void dot_row(const uint8_t* row, const QuantizedRows& x, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t kSubs = T::kValues / kSub;
  const int64_t K = x.K, groups = K / kSub, blocks = K / T::kValues;
  const int8_t* xq = x.values.data() + m0 * K;
  const float* dx = x.scales.data() + m0 * blocks;
  const int16_t* sums = x.sums.data() + m0 * groups;
  __m256 acc[R];
  float offsets[R];  // the K-quants' offsets' term (Q4_0's and Q5_0's is in their integer sums)
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offsets[r] = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * T::kBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    T::sub_blocks(block, [&](int sub, __m256i q, __m256i scales) {
      const int64_t g = b * kSubs + sub;
      const __m256i magnitude = T::kUnsigned ? q : _mm256_sign_epi8(q, q);
      for (int r = 0; r < R; ++r) {
        const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + g * kSub));
        const __m256i signed_x = T::kUnsigned ? xr : _mm256_sign_epi8(xr, q);
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), scales));
      }
    });
    if constexpr (T::kOffset) {
      int16_t levels[kSubs];
      T::offset_levels(block, levels);
      for (int r = 0; r < R; ++r) {
        const int32_t offset = offset_sum(levels, sums + r * groups + b * kSubs);
        if constexpr (kSubs == 1)  // Q4_0, Q5_0: w = d * (q - level), one integer sum
          sum[r] = _mm256_sub_epi32(sum[r], _mm256_setr_epi32(offset, 0, 0, 0, 0, 0, 0, 0));
        else
          offsets[r] += T::offset_scale(block) * dx[r * blocks + b] * static_cast<float>(offset);
      }
    }
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

// ---- Rows laid out 8 at a time ----------------------------------------------------------------------
// Row by row, a product decodes each row's blocks a sub-block at a time and reduces its sum across lanes:
// as many instructions again as the multiplies, which bound it (Q4_K and Q5_0 8-10 GB/s a core, where
// DRAM gives more). Laid out 8 rows at a time (pack_blocks, once after loading), a block's 8 rows lie
// together, their levels in 8-column chunks with row i in lane i (as cpu.cpp's int4 kernel reads them):
// byte j of a row's 4 holds its column 8 c + j (low nibble) and 8 c + j + 4 (high); Q8_0's whole-byte
// levels, 4 columns a lane. Each vpmaddubsw then multiplies 4 columns of all 8 rows, the rows' scales are
// vectors, and the sums land one row per lane.
// llama.cpp's CPU backend repacks Q4_0 and Q4_K likewise. A laid-out type is its ggml type + kPacked.
constexpr int64_t kPacked = 256;

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// 32 levels (bytes 0-31, at most 15 each) -> a row's 4 chunks' bytes, chunk c at out + 32 c.
inline void store_chunks(__m256i levels, uint8_t* out) {
  alignas(32) uint32_t words[8];  // word 2 c: columns 8 c .. 8 c + 3, each with its column + 4 above
  _mm256_store_si256(reinterpret_cast<__m256i*>(words), _mm256_or_si256(levels, _mm256_slli_epi16(_mm256_srli_si256(levels, 4), 4)));
  for (int c = 0; c < 4; ++c) std::memcpy(out + 32 * c, words + 2 * c, 4);
}

// Asks for the cache lines kPrefetchBytes ahead of `bytes` bytes read from p.
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes + line, _MM_HINT_T0);
}

// The bits of each byte of v from bit kBit on, moved up to bit 4 and kept where kMask (0x10: one bit, 0x30:
// two) says: a 5th or 6th level bit in place. The 16-bit shifts move no other byte's bits into the mask.
template <int kBit, int kMask>
inline __m256i bits_at_4(__m256i v) {
  if constexpr (kBit < 4) return _mm256_and_si256(_mm256_slli_epi16(v, 4 - kBit), _mm256_set1_epi8(kMask));
  else return _mm256_and_si256(_mm256_srli_epi16(v, kBit - 4), _mm256_set1_epi8(kMask));
}

// A laid-out chunk's level of row i, column v of its sub-block (levels at `chunks`).
inline int chunk_level(const uint8_t* chunks, int i, int v) {
  return (chunks[32 * (v / 8) + 4 * i + v % 4] >> (v % 8 >= 4 ? 4 : 0)) & 0x0F;
}

// pairs[r] lane i += row i's levels of chunk c (at `chunks`) times x row r's same 8 columns (at xq + r K), as
// 16-bit pair sums (each at most 2 levels * 127: the caller widens them before they overflow); `top_bits`:
// the bits above the nibbles of the chunk's low and high levels, in place (Q5_0's fifth, Q6_K's top two).
template <int R>
inline void chunk_product(const uint8_t* chunks, int c, const int8_t* xq, int64_t K, __m256i (&pairs)[R],
                          const __m256i* top_bits = nullptr) {
  const __m256i packed = load32(chunks + 32 * c);
  __m256i low = low_nibbles(packed), high = high_nibbles(packed);
  if (top_bits) low = _mm256_or_si256(low, top_bits[0]), high = _mm256_or_si256(high, top_bits[1]);
  for (int r = 0; r < R; ++r)
    pairs[r] = _mm256_add_epi16(pairs[r], _mm256_add_epi16(_mm256_maddubs_epi16(low, broadcast4(xq + r * K + 8 * c)),
                                                           _mm256_maddubs_epi16(high, broadcast4(xq + r * K + 8 * c + 4))));
}

// Q4_K, per 8 rows and super-block 1184 bytes (148 a row, the file's 144 with the 6-bit scales and
// minimums as bytes): d [row 8] f16 | dmin [row 8] f16 | scales [sub-block 8][row 8] |
// minimums [sub-block pair 4][row 8][2] | levels [sub-block 8][chunk 4][row 8][4].
struct Q4_Kx8 {
  static constexpr int64_t kType = kQ4_K + kPacked, kValues = 256, kBytes = 1184;
  static constexpr int64_t kDmin = 16, kScales = 32, kMins = 96, kLevels = 160;
  static int64_t min_at(int sub, int row) { return kMins + 16 * (sub / 2) + 2 * row + sub % 2; }

  using Plain = Q4_K;

  // Row i's block of the file into the 8 rows' laid-out block o.
  static void pack(const uint8_t* block, int i, uint8_t* o) {
    std::memcpy(o + 2 * i, block, 2);
    std::memcpy(o + kDmin + 2 * i, block + 2, 2);
    int16_t scale[8], min[8];
    six_bit_values(block + 4, false, scale);
    six_bit_values(block + 4, true, min);
    for (int sub = 0; sub < 8; ++sub) {
      o[kScales + 8 * sub + i] = static_cast<uint8_t>(scale[sub]);
      o[min_at(sub, i)] = static_cast<uint8_t>(min[sub]);
      // sub-block 2 j + h: bytes 32 j .. 32 j + 31, nibble h
      store_chunks(low_nibbles(_mm256_srli_epi16(load32(block + 16 + 32 * (sub / 2)), 4 * (sub % 2))),
                   o + kLevels + 128 * sub + 4 * i);
    }
  }

  // Row i, as Q4_K's: w = d * (s * q) - dmin * m.
  static void dequantize_row(const uint8_t* group, int64_t blocks, int i, float* w) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* p = group + b * kBytes;
      const float d = half_at(p + 2 * i), dmin = half_at(p + kDmin + 2 * i);
      for (int sub = 0; sub < 8; ++sub) {
        const int16_t scale = p[kScales + 8 * sub + i];
        const float m = dmin * static_cast<int16_t>(p[min_at(sub, i)]);
        for (int v = 0; v < kSub; ++v)
          w[b * kValues + sub * kSub + v] = d * static_cast<float>(scale * chunk_level(p + kLevels + 128 * sub, i, v)) - m;
      }
    }
  }

  // acc[r] lane i += row i . x row m0 + r over the super-block at p (x's block b).
  template <int R>
  static void dot(const uint8_t* p, const QuantizedRows& x, int64_t m0, int64_t b, __m256 (&acc)[R]) {
    const int64_t K = x.K, blocks = K / kValues, groups = K / kSub;
    const int8_t* xq = x.values.data() + m0 * K + b * kValues;
    const int16_t* sums = x.sums.data() + m0 * groups + b * 8;
    __m256i scaled[R], offsets[R];  // per row lane: sum of scale * (levels . x), sum of minimum * sum of x
    for (int r = 0; r < R; ++r) scaled[r] = offsets[r] = _mm256_setzero_si256();
    for (int sub = 0; sub < 8; ++sub) {
      const uint8_t* chunks = p + kLevels + 128 * sub;
      prefetch_ahead(chunks, 128);
      const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + kScales + 8 * sub));
      const __m256i scales = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(eight, eight));  // row i's in lane i, twice
      __m256i pairs[R];  // 15 * 127 * 16 < 32768
      for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) chunk_product<R>(chunks, c, xq + sub * kSub, K, pairs);
      for (int r = 0; r < R; ++r) scaled[r] = _mm256_add_epi32(scaled[r], _mm256_madd_epi16(pairs[r], scales));
    }
    for (int pair = 0; pair < 4; ++pair) {  // row i's two minimums in lane i, times x's two sub-block sums
      const __m256i mins = _mm256_cvtepu8_epi16(load16(p + kMins + 16 * pair));
      for (int r = 0; r < R; ++r) {
        int32_t two;
        std::memcpy(&two, sums + r * groups + 2 * pair, sizeof two);
        offsets[r] = _mm256_add_epi32(offsets[r], _mm256_madd_epi16(mins, _mm256_set1_epi32(two)));
      }
    }
    const __m256 d = _mm256_cvtph_ps(load16(p)), dmin = _mm256_cvtph_ps(load16(p + kDmin));
    for (int r = 0; r < R; ++r) {
      const __m256 dx = _mm256_set1_ps(x.scales[(m0 + r) * blocks + b]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled[r]), _mm256_mul_ps(d, dx), acc[r]);
      acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(offsets[r]), _mm256_mul_ps(dmin, dx), acc[r]);
    }
  }
};

// Q5_0, per 8 rows and block 176 bytes (as the file's 8 x 22): d [row 8] f16 | fifth bits [row 8][4]:
// byte j of a row's 4, bit 2 c the fifth bit of column 8 c + j, bit 2 c + 1 of 8 c + j + 4 |
// levels' low 4 bits [chunk 4][row 8][4].
struct Q5_0x8 {
  static constexpr int64_t kType = kQ5_0 + kPacked, kValues = 32, kBytes = 176;
  static constexpr int64_t kFifth = 16, kLevels = 48;

  using Plain = Q5_0;

  static void pack(const uint8_t* block, int i, uint8_t* o) {
    std::memcpy(o + 2 * i, block, 2);
    uint32_t fifth;  // bit v: value v's
    std::memcpy(&fifth, block + 2, sizeof fifth);
    store_chunks(low_nibbles(split_nibbles(block + 6)), o + kLevels + 4 * i);
    for (int j = 0; j < 4; ++j) {
      uint8_t bits = 0;
      for (int c = 0; c < 4; ++c) bits |= ((fifth >> (8 * c + j)) & 1) << (2 * c) | ((fifth >> (8 * c + j + 4)) & 1) << (2 * c + 1);
      o[kFifth + 4 * i + j] = bits;
    }
  }

  // Row i, as Q5_0's: w = d * q - 16 d.
  static void dequantize_row(const uint8_t* group, int64_t blocks, int i, float* w) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* p = group + b * kBytes;
      const float d = half_at(p + 2 * i), m = d * static_cast<int16_t>(16);
      for (int v = 0; v < kSub; ++v) {
        const int fifth = (p[kFifth + 4 * i + v % 4] >> (2 * (v / 8) + (v % 8 >= 4))) & 1;
        w[b * kValues + v] = d * static_cast<float>(chunk_level(p + kLevels, i, v) | fifth << 4) - m;
      }
    }
  }

  template <int R>
  static void dot(const uint8_t* p, const QuantizedRows& x, int64_t m0, int64_t b, __m256 (&acc)[R]) {
    const int64_t K = x.K, blocks = K / kValues;
    prefetch_ahead(p, kBytes);
    const __m256i bits = load32(p + kFifth);
    const __m256i fifth[8] = {bits_at_4<0, 0x10>(bits), bits_at_4<1, 0x10>(bits), bits_at_4<2, 0x10>(bits), bits_at_4<3, 0x10>(bits),
                              bits_at_4<4, 0x10>(bits), bits_at_4<5, 0x10>(bits), bits_at_4<6, 0x10>(bits), bits_at_4<7, 0x10>(bits)};
    const int8_t* xq = x.values.data() + m0 * K + b * kValues;
    __m256i sums[R];
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
    for (int half = 0; half < 2; ++half) {  // pair sums widened every two chunks: 31 * 127 * 8 < 32768
      __m256i pairs[R];
      for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
      for (int c = 2 * half; c < 2 * half + 2; ++c) chunk_product<R>(p + kLevels, c, xq, K, pairs, fifth + 2 * c);
      for (int r = 0; r < R; ++r) sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(pairs[r], _mm256_set1_epi16(1)));
    }
    const __m256 d = _mm256_cvtph_ps(load16(p));
    for (int r = 0; r < R; ++r) {  // w = d (q - 16): each row's sum less 16 times the sum of x
      const int64_t block = (m0 + r) * blocks + b;
      const __m256i centred = _mm256_sub_epi32(sums[r], _mm256_set1_epi32(16 * x.sums[block]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(d, _mm256_set1_ps(x.scales[block])), acc[r]);
    }
  }
};

// Q6_K, per 8 rows and super-block 1680 bytes (as the file's 8 x 210): d [row 8] f16 |
// scales [sub-block 8][half 2][row 8] int8 (values 0-15 and 16-31 of the sub-block) |
// levels' low 4 bits [sub-block 8][chunk 4][row 8][4] | their top 2 bits [sub-block 8][chunk pair 2][row 8][4]:
// byte j of a row's 4, bits 4 (c % 2) + 2 h the top bits of column 8 c + j + 4 h. Levels q are unsigned
// (0-63), w = d * s * (q - 32): each row's sum less 32 times its scales times x's sums of 16.
struct Q6_Kx8 {
  static constexpr int64_t kType = kQ6_K + kPacked, kValues = 256, kBytes = 1680;
  static constexpr int64_t kScales = 16, kLevels = 144, kTop = 1168;
  using Plain = Q6_K;

  // Sub-block sub = 4 half + t of a file's block: its 32 levels' low 4 bits, or (`top`) their top 2 bits.
  static __m256i file_levels(const uint8_t* block, int sub, bool top) {
    const int half = sub / 4, t = sub % 4;
    if (top) return _mm256_and_si256(_mm256_srli_epi16(load32(block + 128 + 32 * half), 2 * t), _mm256_set1_epi8(3));
    return low_nibbles(_mm256_srli_epi16(load32(block + 64 * half + 32 * (t % 2)), 4 * (t / 2)));
  }

  static void pack(const uint8_t* block, int i, uint8_t* o) {
    std::memcpy(o + 2 * i, block + 208, 2);
    const auto* scales = reinterpret_cast<const int8_t*>(block + 192);
    for (int sub = 0; sub < 8; ++sub) {
      for (int half = 0; half < 2; ++half) o[kScales + 16 * sub + 8 * half + i] = static_cast<uint8_t>(scales[2 * sub + half]);
      store_chunks(file_levels(block, sub, false), o + kLevels + 128 * sub + 4 * i);
      alignas(32) uint8_t top[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(top), file_levels(block, sub, true));
      for (int pair = 0; pair < 2; ++pair)
        for (int j = 0; j < 4; ++j) {
          uint8_t bits = 0;
          for (int c = 2 * pair; c < 2 * pair + 2; ++c)
            for (int h = 0; h < 2; ++h) bits |= top[8 * c + j + 4 * h] << (4 * (c % 2) + 2 * h);
          o[kTop + 64 * sub + 32 * pair + 4 * i + j] = bits;
        }
    }
  }

  // Row i, as Q6_K's: w = d * (s * (q - 32)).
  static void dequantize_row(const uint8_t* group, int64_t blocks, int i, float* w) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* p = group + b * kBytes;
      const float d = half_at(p + 2 * i);
      for (int sub = 0; sub < 8; ++sub)
        for (int v = 0; v < kSub; ++v) {
          const int c = v / 8, h = v % 8 >= 4;
          const int top = (p[kTop + 64 * sub + 32 * (c / 2) + 4 * i + v % 4] >> (4 * (c % 2) + 2 * h)) & 3;
          const int q = (chunk_level(p + kLevels + 128 * sub, i, v) | top << 4) - 32;
          const int16_t scale = static_cast<int8_t>(p[kScales + 16 * sub + 8 * (v / 16) + i]);
          w[b * kValues + sub * kSub + v] = d * static_cast<float>(scale * q);
        }
    }
  }

  template <int R>
  static void dot(const uint8_t* p, const QuantizedRows& x, int64_t m0, int64_t b, __m256 (&acc)[R]) {
    const int64_t K = x.K, blocks = K / kValues;
    const int8_t* xq = x.values.data() + m0 * K + b * kValues;
    const int16_t* half_sums = x.half_sums.data() + (m0 * K + b * kValues) / 16;
    __m256i scaled[R], offsets[R];  // per row lane: sum of scale * (levels . x), sum of scale * sum of x
    for (int r = 0; r < R; ++r) scaled[r] = offsets[r] = _mm256_setzero_si256();
    for (int sub = 0; sub < 8; ++sub) {
      const uint8_t* chunks = p + kLevels + 128 * sub;
      prefetch_ahead(chunks, 128);
      prefetch_ahead(p + kTop + 64 * sub, 64);
      const __m128i both = load16(p + kScales + 16 * sub);  // rows' scales of values 0-15, then 16-31
      const __m256i halves[2] = {_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(both, both)),  // row i's in lane i, twice
                                 _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(both, both))};
      const __m256i side_by_side = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(both, _mm_srli_si128(both, 8)));
      for (int pair = 0; pair < 2; ++pair) {
        const __m256i top = load32(p + kTop + 64 * sub + 32 * pair);
        const __m256i tops[4] = {bits_at_4<0, 0x30>(top), bits_at_4<2, 0x30>(top), bits_at_4<4, 0x30>(top), bits_at_4<6, 0x30>(top)};
        for (int c = 2 * pair; c < 2 * pair + 2; ++c) {
          __m256i pairs[R];  // 63 * 127 * 4 < 32768: widened every chunk
          for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
          chunk_product<R>(chunks, c, xq + sub * kSub, K, pairs, tops + 2 * (c % 2));
          for (int r = 0; r < R; ++r) scaled[r] = _mm256_add_epi32(scaled[r], _mm256_madd_epi16(pairs[r], halves[pair]));
        }
      }
      for (int r = 0; r < R; ++r) {  // row i's two scales in lane i, times x's two sums of 16
        int32_t two;
        std::memcpy(&two, half_sums + r * (K / 16) + 2 * sub, sizeof two);
        offsets[r] = _mm256_add_epi32(offsets[r], _mm256_madd_epi16(side_by_side, _mm256_set1_epi32(two)));
      }
    }
    const __m256 d = _mm256_cvtph_ps(load16(p));
    for (int r = 0; r < R; ++r) {
      const __m256i centred = _mm256_sub_epi32(scaled[r], _mm256_slli_epi32(offsets[r], 5));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(d, _mm256_set1_ps(x.scales[(m0 + r) * blocks + b])), acc[r]);
    }
  }
};

// Q8_0, per 8 rows and block 272 bytes (as the file's 8 x 34): d [row 8] f16 | levels [4 columns 8][row 8][4],
// int8. vpmaddubsw takes the levels' magnitudes and x carrying their signs; each 4 columns' pair sums (up
// to 2 * 128 * 127) are widened at once.
struct Q8_0x8 {
  static constexpr int64_t kType = kQ8_0 + kPacked, kValues = 32, kBytes = 272;
  static constexpr int64_t kLevels = 16;
  using Plain = Q8_0;

  static void pack(const uint8_t* block, int i, uint8_t* o) {
    std::memcpy(o + 2 * i, block, 2);
    for (int c = 0; c < 8; ++c) std::memcpy(o + kLevels + 32 * c + 4 * i, block + 2 + 4 * c, 4);
  }

  // Row i, as Q8_0's: w = d * q.
  static void dequantize_row(const uint8_t* group, int64_t blocks, int i, float* w) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* p = group + b * kBytes;
      const float d = half_at(p + 2 * i);
      for (int v = 0; v < kSub; ++v)
        w[b * kValues + v] = d * static_cast<float>(static_cast<int8_t>(p[kLevels + 32 * (v / 4) + 4 * i + v % 4]));
    }
  }

  template <int R>
  static void dot(const uint8_t* p, const QuantizedRows& x, int64_t m0, int64_t b, __m256 (&acc)[R]) {
    const int64_t K = x.K, blocks = K / kValues;
    prefetch_ahead(p, kBytes);
    const int8_t* xq = x.values.data() + m0 * K + b * kValues;
    __m256i sums[R];
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i levels = load32(p + kLevels + 32 * c), magnitudes = _mm256_sign_epi8(levels, levels);
      for (int r = 0; r < R; ++r) {
        const __m256i signed_x = _mm256_sign_epi8(broadcast4(xq + r * K + 4 * c), levels);
        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, signed_x), _mm256_set1_epi16(1)));
      }
    }
    const __m256 d = _mm256_cvtph_ps(load16(p));
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_mul_ps(d, _mm256_set1_ps(x.scales[(m0 + r) * blocks + b])), acc[r]);
  }
};

template <typename F>
bool with_laid_out_format(int64_t type, F&& body) {
  switch (type) {
    case Q4_Kx8::kType: return body(Q4_Kx8{}), true;
    case Q5_0x8::kType: return body(Q5_0x8{}), true;
    case Q6_Kx8::kType: return body(Q6_Kx8{}), true;
    case Q8_0x8::kType: return body(Q8_0x8{}), true;
    default: return false;
  }
}

// Output rows [n0, n1) (multiples of 8) of a part laid out 8 rows at a time into y [M, ldy].
template <typename T>
void product_rows_x8(const uint8_t* rows, int64_t stride, const QuantizedRows& x, int64_t M, int64_t n0, int64_t n1,
                     float* y, int64_t ldy) {
  const int64_t blocks = x.K / T::kValues;
  auto rows_times = [&](auto block, const uint8_t* group, int64_t m) {
    constexpr int R = decltype(block)::value;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) T::template dot<R>(group + b * T::kBytes, x, m, b, acc);
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (m + r) * ldy, acc[r]);
  };
  y += n0;
  for (int64_t n = n0; n < n1; n += 8, y += 8) {
    const uint8_t* group = rows + n * stride;  // 8 rows' bytes, contiguous
    int64_t m = 0;
    for (; m + kRowsPerPass <= M; m += kRowsPerPass) rows_times(std::integral_constant<int, kRowsPerPass>{}, group, m);
    for (; m < M; ++m) rows_times(std::integral_constant<int, 1>{}, group, m);
  }
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t K, const char* op) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.is_cpu(), op,
              ": the blocks must be a contiguous uint8 matrix on the CPU");
  const bool laid_out = with_laid_out_format(type, [&](auto format) {
    using T = decltype(format);
    TORCH_CHECK(K % T::kValues == 0 && K / T::kValues * T::kBytes <= 8 * blocks.size(1), op, ": rows of ", K,
                " values laid out 8 at a time as ggml type ", type - kPacked, " do not fit rows of ", blocks.size(1), " bytes");
  });
  if (laid_out) return;
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
  const bool laid_out = with_laid_out_format(type, [&](auto format) {
    using T = decltype(format);
    TORCH_CHECK(N % 8 == 0, "dequantize_blocks: rows laid out 8 at a time come in eights, got ", N);
    parallel_output_rows(N, 8, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) T::dequantize_row(bp + (n - n % 8) * stride, K / T::kValues, n % 8, op + n * K);
    });
  });
  if (laid_out) return out;
  with_format(type, [&](auto format) {
    using T = decltype(format);
    parallel_output_rows(N, 1, [&](int64_t n0, int64_t n1) {
      alignas(32) int8_t q[kSub];
      alignas(32) int16_t s[16];
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t b = 0; b < K / T::kValues; ++b) {
          const uint8_t* block = bp + n * stride + b * T::kBytes;
          const float d = T::scale(block);
          int16_t offset_levels[T::kValues / kSub] = {};
          if constexpr (T::kOffset) T::offset_levels(block, offset_levels);
          T::sub_blocks(block, [&](int sub, __m256i levels, __m256i scales) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(q), levels);
            _mm256_store_si256(reinterpret_cast<__m256i*>(s), scales);
            float m = 0.0f;
            if constexpr (T::kOffset) m = T::offset_scale(block) * offset_levels[sub];
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
    auto rounded_x = [&](int64_t values) -> const QuantizedRows& {
      std::optional<QuantizedRows>& xq = by_block[values == 256];
      if (!xq) xq = quantize_rows(xf.data_ptr<float>(), M, K, values);
      return *xq;
    };
    const bool laid_out = with_laid_out_format(type, [&](auto format) {
      using T = decltype(format);
      TORCH_CHECK(rows % 8 == 0, "gemv_blocks: rows laid out 8 at a time come in eights, got ", rows);
      const QuantizedRows& xq = rounded_x(T::kValues);
      parallel_output_rows(rows, 8, [&](int64_t n0, int64_t n1) { product_rows_x8<T>(part, stride, xq, M, n0, n1, yp + first, N); });
    });
    if (!laid_out) {
      with_format(type, [&](auto format) {
        using T = decltype(format);
        const QuantizedRows& xq = rounded_x(T::kValues);
        parallel_output_rows(rows, 1, [&](int64_t n0, int64_t n1) { product_rows<T>(part, stride, xq, M, n0, n1, yp + first, N); });
      });
    }
    first += rows;
  }
  TORCH_CHECK(first == N, "gemv_blocks: the layout covers ", first, " rows of the blocks' ", N);
  return y.to(x.scalar_type());
}

// Lays rows of blocks (uint8 [rows, stride], rows in eights) out 8 at a time in place, for the products
// above; returns the type the layout then gives them (Q4_K, Q5_0, Q6_K and Q8_0 have such layouts).
int64_t pack_blocks(const at::Tensor& blocks, int64_t type, int64_t K) {
  TORCH_CHECK(with_laid_out_format(type + kPacked, [](auto) {}),
              "pack_blocks: only Q4_K, Q5_0, Q6_K and Q8_0 rows are laid out 8 at a time, not ggml type ", type);
  check_blocks(blocks, type + kPacked, K, "pack_blocks");
  TORCH_CHECK(blocks.size(0) % 8 == 0, "pack_blocks: rows come in eights, got ", blocks.size(0));
  const int64_t stride = blocks.size(1);
  uint8_t* bp = blocks.data_ptr<uint8_t>();
  with_laid_out_format(type + kPacked, [&](auto format) {
    using T = decltype(format);
    parallel_output_rows(blocks.size(0), 8, [&](int64_t n0, int64_t n1) {
      std::vector<uint8_t> rows(8 * stride);
      for (int64_t n = n0; n < n1; n += 8) {
        std::memcpy(rows.data(), bp + n * stride, rows.size());
        for (int64_t b = 0; b < K / T::kValues; ++b)
          for (int i = 0; i < 8; ++i) T::pack(rows.data() + i * stride + b * T::Plain::kBytes, i, bp + n * stride + b * T::kBytes);
      }
    });
  });
  return type + kPacked;
}

}  // namespace lmgen

TORCH_LIBRARY_FRAGMENT(lmgen, m) {
  m.def("gemv_blocks(Tensor x, Tensor blocks, Tensor layout) -> Tensor");
  m.def("dequantize_blocks(Tensor blocks, int ggml_type, int in_features) -> Tensor");
  m.def("pack_blocks(Tensor(a!) blocks, int ggml_type, int in_features) -> int");
}

TORCH_LIBRARY_IMPL(lmgen, CPU, m) {
  m.impl("gemv_blocks", &lmgen::gemv_blocks);
  m.impl("dequantize_blocks", &lmgen::dequantize_blocks);
  m.impl("pack_blocks", &lmgen::pack_blocks);
}
