// lmgen's CPU kernels: products of a few activation rows with a weight matrix, reading the
// weight at DRAM speed; decode attention over the paged KV cache; and the layers' small
// elementwise steps (norms, activations, rotary), one call each instead of a handful of
// PyTorch operator calls whose dispatch, at batch 1, costs more than their arithmetic.
//
// Products. Batch-1 decode is one pass over every weight per token, so its speed is the speed at
// which these products stream weights from memory. PyTorch's CPU kernels for one row
// interleave several weight rows, which splits the read into many short streams that
// the hardware prefetcher follows poorly (11-14 GB/s on a 2-core AVX2 machine whose
// DRAM gives 25-30). Here each thread takes one contiguous range of output rows, cuts it
// into a few parts and walks them front to back side by side: a few long sequential
// streams per thread (one stream alone left a core 25-35% short of what DRAM gives it).
// Each weight row is read once and multiplied with every activation row while it sits in L1.
// Products of many rows are bound by arithmetic instead: they run in register tiles (by_tiles).
//
// x: [M, K] float32, bfloat16 or float16, K a multiple of 32; y: [M, N] in x's dtype,
// computed in float32 and rounded once (as PyTorch's half-precision products round).
// Weights: float32, bfloat16 or float16 [N, K]; int8 [N, K] with a scale per row;
// int4 [N, K/2] two columns per byte with a scale and a zero per group: w = (q - 8) * scale
// + zero; N a multiple of 8, in the int4 kernel's layout: each 8 rows' 8-column chunks are 32
// bytes, lane i (bytes 4i .. 4i + 3) holding row i's chunk, byte j its column j (low nibble) and
// j + 4 (high), so that one load and two masks give 4 columns of 8 rows side by side; chunks in
// column order, so that reading 8 rows at once is one stream and a group's bytes are contiguous;
// and their scales and zeros [N/8, groups, 8] likewise, so that a group's 8 are one vector.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <cmath>
#include <tuple>
#include <utility>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml_blocks.h"

namespace {

constexpr int64_t kRowsPerBlock = 4;  // activation rows multiplied per pass over a weight row
constexpr int64_t kMinRowsPerThread = 64;
// How far ahead of its reads a thread asks for its weight rows' cache lines, one prefetch per
// line (half-precision, int8 and int4 weights; float32 ones leave it to the hardware: dot_rows).
// Alternating steps: int4 and int8 256-512 bytes ahead 1.03-1.11x the time, 2048 the same.
constexpr int64_t kPrefetchBytes = 1024;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 16 consecutive elements as two float vectors, in the order pair_order gives. bfloat16: one 32-byte
// load holds them as 8 even elements in the low halves of its 32-bit lanes and 8 odd ones in the high
// halves, so a shift and a mask give both vectors, where widening each half (load8) takes a shuffle
// unit's 2 uops. Decode attention converts every cached element it reads: with its rows in L2, 1
// thread, 400 positions, 0.87x the time (5 pairs of builds alternating); from L3 no change.
inline void load16(const c10::BFloat16* p, __m256& first, __m256& second) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  first = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  second = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
template <typename T>
inline void load16(const T* p, __m256& first, __m256& second) {
  first = load8(p);
  second = load8(p + 8);
}
// Which of the 16 elements load16 puts at lane i of its vector pair (first's lanes 0-7, then second's).
template <typename T>
constexpr int64_t pair_order(int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return i < 8 ? 2 * i : 2 * (i - 8) + 1;
  return i;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Eight float vectors -> one vector of their eight sums.
inline __m256 sum_each(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// 8 floats rounded to T's precision (to nearest even, as PyTorch's casts round), as floats:
// what storing them as T and loading them back gives, without leaving the registers.
inline __m256 round8(__m256 v, float) { return v; }
inline __m256 round8(__m256 v, c10::BFloat16) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  const __m256 top = _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(-65536)));
  return _mm256_blendv_ps(top, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // a NaN stays a NaN
}
inline __m256 round8(__m256 v, c10::Half) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }

// Stores 8 floats already rounded to T's precision (round8), so the conversion is exact.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float scalar(float v) { return v; }
inline float scalar(c10::BFloat16 v) { return static_cast<float>(v); }
inline float scalar(c10::Half v) { return static_cast<float>(v); }

// n float32 values rounded into T's.
template <typename T>
void round_into(const float* values, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, round8(_mm256_loadu_ps(values + i), T{}));
  for (; i < n; ++i) out[i] = static_cast<T>(values[i]);
}

// Calls body(T{}) with T the C++ type of a float32, bfloat16 or float16 tensor's elements.
template <typename F>
void with_float_type(at::ScalarType type, const char* op, F&& body) {
  switch (type) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(c10::BFloat16{});
    case at::kHalf: return body(c10::Half{});
    default: TORCH_CHECK(false, op, ": float32, bfloat16 or float16 expected, got ", type);
  }
}

// decode_layers holds one OpenMP region for its whole layer loop and lends the region's threads
// to the loops of the kernels it calls (a crew): the calling thread posts each loop's body and
// takes its own share while the others take theirs, where an at::parallel_for per loop starts and
// joins a region each time (~2 us a loop, ~150 loops a batch-1 step).
struct Crew {
  int64_t threads = 1;
  std::atomic<int64_t> posted{0}, finished{0};
  std::atomic<bool> closing{false}, failed{false};
  const std::function<void(int64_t)>* job = nullptr;  // (*job)(thread)
  std::exception_ptr error;  // the first a member's share threw, rethrown by the leader
};
thread_local Crew* t_crew = nullptr;  // the crew the calling thread leads, if any

// Waits until done(): spinning first, since on a host with a core per thread the others answer within
// microseconds, then giving the core away on each try. On a host busier than its cores, a thread that
// only spins burns the time slice its descheduled partner needs to finish (bench MoE file, 2 threads
// beside 4 busy processes on 2 cores: 2-5 tokens/s).
constexpr int kSpinsBeforeYielding = 1 << 11;  // tens of microseconds of _mm_pause

template <typename F>
void wait_until(F&& done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < kSpinsBeforeYielding) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// A crew member other than the leader: runs each posted job until the leader closes the crew.
void serve(Crew& crew, int64_t thread) {
  for (int64_t seen = 0;;) {
    int64_t posted;
    wait_until([&] { return (posted = crew.posted.load(std::memory_order_acquire)) != seen; });
    seen = posted;
    if (crew.closing.load(std::memory_order_relaxed)) return;
    try {
      (*crew.job)(thread);
    } catch (...) {
      if (!crew.failed.exchange(true)) crew.error = std::current_exception();
    }
    crew.finished.fetch_add(1, std::memory_order_release);
  }
}

// Runs lead() on the calling thread with the other threads of one OpenMP region as its crew.
template <typename F>
void with_crew(F&& lead) {
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || t_crew != nullptr || at::in_parallel_region()) return lead();
  Crew crew;
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    const int64_t thread = omp_get_thread_num();
    if (thread == 0) {
      crew.threads = omp_get_num_threads();
      t_crew = &crew;
      try {
        lead();
      } catch (...) {
        error = std::current_exception();
      }
      t_crew = nullptr;
      crew.closing.store(true, std::memory_order_relaxed);
      crew.posted.fetch_add(1, std::memory_order_release);
    } else {
      serve(crew, thread);
    }
  }
  if (error) std::rethrow_exception(error);
}

// body(first, last) over [begin, end) in one chunk per thread of at least `grain`, as
// at::parallel_for cuts it; on the crew while the calling thread leads one.
template <typename F>
void parallel_ranges(int64_t begin, int64_t end, int64_t grain, const F& body) {
  Crew* crew = t_crew;
  if (crew == nullptr) return at::parallel_for(begin, end, grain, body);
  const int64_t range = end - begin, used = std::min(crew->threads, (range + grain - 1) / std::max<int64_t>(grain, 1));
  if (range <= 0) return;
  if (used <= 1) return body(begin, end);
  const int64_t chunk = (range + used - 1) / used;
  const std::function<void(int64_t)> job = [&](int64_t thread) {
    const int64_t first = begin + thread * chunk, last = std::min(end, first + chunk);
    if (first < last) body(first, last);
  };
  crew->finished.store(0, std::memory_order_relaxed);
  crew->job = &job;
  crew->posted.fetch_add(1, std::memory_order_release);
  std::exception_ptr error;
  try {
    job(0);
  } catch (...) {
    error = std::current_exception();
  }
  wait_until([&] { return crew->finished.load(std::memory_order_acquire) >= crew->threads - 1; });  // job outlives them
  if (crew->failed.exchange(false) && !error) error = crew->error;
  crew->error = nullptr;
  if (error) std::rethrow_exception(error);
}

// Splits the n output rows into one contiguous range per thread, each starting and ending on a
// multiple of `unit` (n one too): the int4 kernel works on 8 rows at a time.
template <typename F>
void for_each_output_range(int64_t n, int64_t unit, F&& body) {
  parallel_ranges(0, n / unit, kMinRowsPerThread / unit,
                  [&](int64_t first, int64_t last) { body(first * unit, last * unit); });
}

// Weight read streams per thread (each thread's rows cut into this many parts, read side by
// side) in products of R activation rows. Blocks of steps alternating in one engine, against
// one stream: float32 and bfloat16 batch 1 0.85-0.94x the time with 4 (2: 0.90-0.94x, 6-8 no
// better); bfloat16 batch 2 / 4 / 16 0.86x / 0.90x / 0.73x with 2, and batch 2 0.94x with 4
// against 2 (blocks of 4 rows with 4: 0.95x at batch 4 but 1.04x at 16, so they keep 2). int8
// batch 1 / 2 0.91-0.94x / 0.93x with 2, but 1.11-1.13x at 4 and 16 rows, whose integer work per
// byte leaves no DRAM time to win; int4 (8-row blocks) 0.89x with 2 at batch 1, 0.99-1.03x at 4
// and 16 rows.
constexpr int float_streams(int R) { return R <= 2 ? 4 : 2; }
constexpr int int8_streams(int R) { return R <= 2 ? 2 : 1; }
constexpr int kInt4Streams = 2;  // one activation row

// Runs kernel(std::integral_constant<int, S>{}, first, part) so that it covers the rows [n0, n1)
// (in units of `unit` rows): a kernel reading S streams takes rows first + s * part + i for
// s < S and 0 <= i < part; the few rows left over, one stream.
template <int S, typename F>
void in_streams(int64_t n0, int64_t n1, int64_t unit, F&& kernel) {
  const int64_t part = (n1 - n0) / unit / S * unit;
  if (part > 0) kernel(std::integral_constant<int, S>{}, n0, part);
  if constexpr (S > 1) {
    if (n0 + S * part < n1) kernel(std::integral_constant<int, 1>{}, n0 + S * part, n1 - n0 - S * part);
  }
}

// y[m, n] += sum_k x[m, k] * w[n, k] over `length` columns, for R activation rows starting at x
// and the rows n = first + s * part + i of w (s < S, i < part), S of them at a time; rows of x are
// x_stride apart, of w w_stride.
template <int R, int S, typename W>
void dot_rows(const float* x, int64_t x_stride, const W* w, int64_t w_stride, int64_t length, int64_t first,
              int64_t part, float* y, int64_t N) {
  constexpr int C = S > 1 ? 1 : R == 1 ? 4 : 2;  // independent sums per row: together they hide the FMA latency
  // float32 rows stream fastest on the hardware prefetcher alone: asking for lines 1 KB ahead, which
  // half-precision rows (more work per byte) want, made a float32 step 4-5% slower, 128 bytes ahead 2-4%
  constexpr bool kAskAhead = sizeof(W) < 4;
  for (int64_t n = first; n < first + part; ++n) {
    const W* rows[S];
    __m256 acc[S][R][C];
    for (int s = 0; s < S; ++s) {
      rows[s] = w + (n + s * part) * w_stride;
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[s][r][c] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < length; k += 8 * C) {
      for (int c = 0; c < C; ++c) {
        for (int s = 0; s < S; ++s) {
          if (kAskAhead && ((k + 8 * c) * sizeof(W)) % 64 == 0)  // a new cache line
            _mm_prefetch(reinterpret_cast<const char*>(rows[s] + k + 8 * c) + kPrefetchBytes, _MM_HINT_T0);
          const __m256 wc = load8(rows[s] + k + 8 * c);
          for (int r = 0; r < R; ++r)
            acc[s][r][c] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x + r * x_stride + k + 8 * c), acc[s][r][c]);
        }
      }
    }
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) {
        for (int c = 1; c < C; ++c) acc[s][r][0] = _mm256_add_ps(acc[s][r][0], acc[s][r][c]);
        y[r * N + n + s * part] += horizontal_sum(acc[s][r][0]);
      }
  }
}

// Calls rows(std::integral_constant<int, R>{}, m) for blocks of R <= kRowsPerBlock activation
// rows starting at row m, so kernels unrolled over R cover any M.
template <typename F>
void by_row_blocks(int64_t M, F&& rows) {
  int64_t m = 0;
  for (; m + kRowsPerBlock <= M; m += kRowsPerBlock) rows(std::integral_constant<int, kRowsPerBlock>{}, m);
  switch (M - m) {
    case 3: rows(std::integral_constant<int, 3>{}, m); break;
    case 2: rows(std::integral_constant<int, 2>{}, m); break;
    case 1: rows(std::integral_constant<int, 1>{}, m); break;
  }
}

// Calls kernel(block, streams, m, first, part) for each block of R activation rows starting at
// row m (by_row_blocks), over the output rows [n0, n1) read in Streams(R) streams (in_streams);
// block and streams are std::integral_constant's holding R and the stream count.
template <auto Streams, typename F>
void by_blocks_in_streams(int64_t M, int64_t n0, int64_t n1, F&& kernel) {
  by_row_blocks(M, [&](auto block, int64_t m) {
    in_streams<Streams(block())>(n0, n1, 1, [&](auto streams, int64_t first, int64_t part) {
      kernel(block, streams, m, first, part);
    });
  });
}

// Products of many rows (batched decode, prompt chunks) are bound by arithmetic, not by reading the
// weights: there each thread walks its output rows a tile at a time, `Width` weight rows (read once
// from memory, then from L1) times every activation row of a panel (kept in L2), in register tiles
// of kRowsPerBlock x Width sums: 12 independent float32 sums (4 x 3) keep both FMA units busy through
// their latency where the streaming kernels' 8 (4 x 2) left a fifth of it idle. Wide rows are cut
// into chunks of columns so that a tile's rows stay in L1 (rows of 8192 columns whole: 0.6x the speed).
//
// Tiles from this many rows per byte of a weight on (lmgen.kernels.TILE_MIN_ROWS): int8 16, half precision
// 32, float32 64; below, the streams, whose reads are the bound (1 thread, bench-125m's shapes: float32
// tiles 0.85x the streams' speed at 16 rows, bfloat16 0.95x, 1.0x at 32 rows, 1.1x from 64).
constexpr int64_t kTileMinRows = 16;
template <typename W>
constexpr bool tiled(int64_t M) { return M >= kTileMinRows * static_cast<int64_t>(sizeof(W)); }
constexpr int64_t kPanelBytes = 192 * 1024;  // activation rows of one panel (float32 or int8), within L2
constexpr int64_t kTileColumns = 768;  // at most, in chunks of equal width: 4 + 3 float32 rows in 21 KiB of L1

// The width of the chunks of columns that cut rows of K columns into as few as take at most `most`, equal up
// to a multiple of 32 (the kernels' unrolled steps).
int64_t chunk_width(int64_t K, int64_t most) {
  const int64_t chunks = (K + most - 1) / most;
  return ((K + chunks - 1) / chunks + 31) / 32 * 32;
}

// Calls tile(block, width, m, n, k, length, first) for blocks of R <= kRowsPerBlock activation rows
// from row m and width <= Width weight rows from row n (std::integral_constant's) over the columns
// [k, k + length) (chunks of `chunk`), covering rows [0, M) times the weight rows [n0, n1) and all K
// columns; `first` says the panel's first block of rows meets these weight columns. An activation
// value takes `value_bytes`.
template <int Width, typename F>
void by_tiles(int64_t M, int64_t K, int64_t chunk, int64_t value_bytes, int64_t n0, int64_t n1, F&& tile) {
  const int64_t panel = std::max(kRowsPerBlock, kPanelBytes / (chunk * value_bytes) / kRowsPerBlock * kRowsPerBlock);
  for (int64_t m0 = 0; m0 < M; m0 += panel) {
    for (int64_t k = 0; k < K; k += chunk) {
      const int64_t length = std::min(chunk, K - k);
      auto rows = [&](auto width, int64_t n) {
        by_row_blocks(std::min(panel, M - m0),
                      [&](auto block, int64_t m) { tile(block, width, m0 + m, n, k, length, m == 0); });
      };
      int64_t n = n0;
      for (; n + Width <= n1; n += Width) rows(std::integral_constant<int, Width>{}, n);
      for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
    }
  }
}

// Weight rows [n, n + count) of a [N, K] weight, over the columns [k, k + length), as float32 rows
// (pointer, stride): a float32 weight's where they lie; others converted into `scratch` when
// `convert`, else left there by the call before.
inline std::pair<const float*, int64_t> float_tile(const float* w, int64_t K, int64_t n, int64_t, int64_t k, int64_t,
                                                   float*, bool) {
  return {w + n * K + k, K};
}
template <typename W>
std::pair<const float*, int64_t> float_tile(const W* w, int64_t K, int64_t n, int64_t count, int64_t k,
                                            int64_t length, float* scratch, bool convert) {
  for (int64_t i = 0; convert && i < count; ++i)
    for (int64_t j = 0; j < length; j += 8) _mm256_storeu_ps(scratch + i * length + j, load8(w + (n + i) * K + k + j));
  return {scratch, length};
}

// y[m, n] += sum_k x[m, k] * w[n, k] for the M float32 rows x and the weight rows [n0, n1), in tiles
// (by_tiles) of float32 weights: half-precision and int8 ones are converted, exactly, once per panel.
template <typename W>
void float_tiles(const float* x, int64_t M, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t N) {
  std::vector<float> scratch(3 * kTileColumns);
  by_tiles<3>(M, K, chunk_width(K, kTileColumns), 4, n0, n1,
              [&](auto block, auto width, int64_t m, int64_t n, int64_t k, int64_t length, bool first) {
                const auto [rows, stride] = float_tile(w, K, n, width(), k, length, scratch.data(), first);
                dot_rows<block(), width()>(x + m * K + k, K, rows, stride, length, 0, 1, y + m * N + n, N);
              });
}

bool is_float_type(at::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

// The activation rows as contiguous float32, the kernels' arithmetic, converted in one loop:
// two dtype copies per product, called from Python or even from C++, cost more at batch 1.
std::vector<float> float_rows(const at::Tensor& x, int64_t in_features, const char* op) {
  TORCH_CHECK(x.dim() == 2 && is_float_type(x.scalar_type()), op,
              ": x must be a float32, bfloat16 or float16 matrix");
  TORCH_CHECK(x.size(1) == in_features, op, ": x has ", x.size(1), " columns, the weight ", in_features);
  TORCH_CHECK(in_features % 32 == 0, op, ": in_features must be a multiple of 32, got ", in_features);
  const at::Tensor rows = x.contiguous();
  std::vector<float> values(rows.numel());
  with_float_type(rows.scalar_type(), op, [&](auto type) {
    const auto* p = rows.data_ptr<decltype(type)>();
    for (size_t i = 0; i < values.size(); ++i) values[i] = scalar(p[i]);
  });
  return values;
}

// A product's float32 sums [M, N] rounded once into a new tensor of x's dtype, as PyTorch's
// half-precision products round. (Kernels that wrote each dtype directly made the build
// take 45 s instead of 28, for no measurable speed.)
at::Tensor rounded_output(const std::vector<float>& sums, const at::Tensor& x, int64_t N) {
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  with_float_type(y.scalar_type(), "product", [&](auto type) {
    round_into(sums.data(), y.data_ptr<decltype(type)>(), static_cast<int64_t>(sums.size()));
  });
  return y;
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "gemv: the weight must be a contiguous matrix");
  const std::vector<float> xf = float_rows(x, w.size(1), "gemv");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> sums(M * N);
  with_float_type(w.scalar_type(), "gemv", [&](auto type) {
    const auto* wp = w.data_ptr<decltype(type)>();
    for_each_output_range(N, 1, [&](int64_t n0, int64_t n1) {
      if (tiled<decltype(type)>(M)) return float_tiles(xf.data(), M, K, wp, n0, n1, sums.data(), N);
      by_blocks_in_streams<float_streams>(M, n0, n1, [&](auto block, auto streams, int64_t m, int64_t first,
                                                         int64_t part) {
        dot_rows<block(), streams()>(xf.data() + m * K, K, wp, K, K, first, part, sums.data() + m * N, N);
      });
    });
  });
  return rounded_output(sums, x, N);
}

// int8 and int4 weights multiply integers, as llama.cpp's q8_0 and q4_0 do: each group of G
// columns of x is rounded to int8 with its own scale (x ~ dx * xq, error <= 1/254 of the group's
// largest value), so 32 products are one vpmaddubsw (unsigned 8-bit times signed 8-bit, in pairs)
// and an add, where converting int8 weights to float32 took three instructions per 8 before
// their FMA: that made the int8 kernel compute-bound at about the DRAM rate (24 GB/s with its
// weights in L2), so it streamed them from DRAM slower than bfloat16's (15-19 vs 23-26 GB/s).
// A product's error from rounding x so is 3-5x what rounding x to bfloat16 would give: about
// the int8 weights' own, small beside the 4-bit ones' (45-65x; tests/layers/test_kernels.py).
// For int4, with levels q in 0..15, the sum splits into
//   sum_k w_k x_k = scale * dx * sum_k (q_k - 8) xq_k + zero * sum_k x_k
// where the first term is centred (rounding x does not bias it) and the second exact.
struct QuantizedRows {
  std::vector<int8_t> values;  // [M, K]
  std::vector<float> scales;   // [M, groups]: dx
  std::vector<float> sums;     // [M, groups]: sum of x over the group
  std::vector<float> rounded_sums;  // [M, groups]: dx * sum of xq over the group
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = M * K / G;
  QuantizedRows q{std::vector<int8_t>(M * K), std::vector<float>(groups), std::vector<float>(groups),
                  std::vector<float>(groups)};
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t g = 0; g < groups; ++g) {
    const float* group = x + g * G;
    __m256 largest = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < G; i += 8) {
      const __m256 v = _mm256_loadu_ps(group + i);
      largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
      sum = _mm256_add_ps(sum, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, largest);
    const float top = *std::max_element(lanes, lanes + 8);
    const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    __m256i rounded_sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < G; i += 32)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.values.data() + g * G + i),
                          lmgen::round_to_int8(group + i, inverse, rounded_sum));
    q.scales[g] = top / 127.0f;
    q.sums[g] = horizontal_sum(sum);
    q.rounded_sums[g] = q.scales[g] * static_cast<float>(lmgen::lane_sum(rounded_sum));
  }
  return q;
}

// The columns each scale of x covers in the int8 kernel (llama.cpp's q8_0 block).
constexpr int64_t kInt8Group = 32;

// 32 products of int8 weights and int8 x as 8 int32 sums: |w| (unsigned) times x carrying w's
// sign, so that vpmaddubsw's pair sums stay within int16 (2 * 128 * 127 < 32768).
inline __m256i int8_products(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

// y[m, n] = scale[n] * sum over the groups g of dx[m, g] * (w[n] . xq[m] over g), R rows of x, the
// rows n = first + s * part + i of w (s < S, i < part), S at a time.
// Two groups per step into two sums, so that consecutive FMAs do not wait on each other.
template <int R, int S, typename Scale>
void dot_rows_int8(const QuantizedRows& x, int64_t m0, int64_t K, const int8_t* w, const Scale* scales,
                   int64_t first, int64_t part, float* y, int64_t N) {
  const int64_t groups = K / kInt8Group;
  const int8_t* xq = x.values.data() + m0 * K;
  const float* dx = x.scales.data() + m0 * groups;
  auto add_group = [&](const int8_t* row, int64_t g, __m256 (&total)[R]) {
    const __m256i weights = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * kInt8Group));
    for (int r = 0; r < R; ++r) {
      const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + g * kInt8Group));
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int8_products(weights, xr)),
                                 _mm256_broadcast_ss(dx + r * groups + g), total[r]);
    }
  };
  for (int64_t n = first; n < first + part; ++n) {
    const int8_t* rows[S];
    __m256 even[S][R], odd[S][R];
    for (int s = 0; s < S; ++s) {
      rows[s] = w + (n + s * part) * K;
      for (int r = 0; r < R; ++r) even[s][r] = odd[s][r] = _mm256_setzero_ps();
    }
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {  // one 64-byte cache line per row and step
      for (int s = 0; s < S; ++s) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[s] + g * kInt8Group) + kPrefetchBytes, _MM_HINT_T0);
        add_group(rows[s], g, even[s]);
        add_group(rows[s], g + 1, odd[s]);
      }
    }
    for (int s = 0; s < S; ++s) {
      if (g < groups) add_group(rows[s], g, even[s]);
      const float scale = scalar(scales[n + s * part]);
      for (int r = 0; r < R; ++r) y[r * N + n + s * part] = scale * horizontal_sum(_mm256_add_ps(even[s][r], odd[s][r]));
    }
  }
}

// An int8 weight and its scales as op's kernel reads them.
void check_int8_weight(const at::Tensor& w, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), op,
              ": the weight must be a contiguous int8 matrix");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) && scales.is_contiguous(), op,
              ": one scale per weight row");
}

// From kTileMinRows rows on (tiled), the int8 weights are converted to float32 a tile at a time (exactly) and
// x multiplies them unrounded, each sum times its row's scale: with both operands in L1 the products
// are bound by arithmetic, and on AVX2 (Zen 2) two integer multiplies per 32 products (vpmaddubsw,
// vpmaddwd) and their scaling ran at 58 GFLOP/s a core where float32 tiles ran at 72-77 (1 thread,
// bench-125m's shapes, benchmarks/batched_products.py), also beating dequantizing then PyTorch's GEMM.
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check_int8_weight(w, scales, "gemv_int8");
  const std::vector<float> xf = float_rows(x, w.size(1), "gemv_int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const QuantizedRows xq = quantize_rows(xf.data(), tiled<int8_t>(M) ? 0 : M, K, kInt8Group);
  std::vector<float> sums(M * N);
  const int8_t* wp = w.data_ptr<int8_t>();
  with_float_type(scales.scalar_type(), "gemv_int8", [&](auto type) {
    const auto* sp = scales.data_ptr<decltype(type)>();
    for_each_output_range(N, 1, [&](int64_t n0, int64_t n1) {
      if (tiled<int8_t>(M)) {
        float_tiles(xf.data(), M, K, wp, n0, n1, sums.data(), N);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) sums[m * N + n] *= scalar(sp[n]);
        return;
      }
      by_blocks_in_streams<int8_streams>(M, n0, n1, [&](auto block, auto streams, int64_t m, int64_t first,
                                                        int64_t part) {
        dot_rows_int8<block(), streams()>(xq, m, K, wp, sp, first, part, sums.data() + m * N, N);
      });
    });
  });
  return rounded_output(sums, x, N);
}

// The dot products of 8 weight rows' levels with R rows of x's quantized values xq (x_stride apart)
// over G columns, as int32s (sums[r] lane i: row i): `chunks` points at the 8 rows' first 8-column chunk of those columns. Each
// chunk's lane i holds row i's 8 levels, so each vpmaddubsw takes x's same 4 columns broadcast to
// every lane and the sums land one row per lane: no horizontal sums.
template <int64_t G, int R>
inline void int4_group_sums(const uint8_t* chunks, const int8_t* xq, int64_t x_stride, __m256i (&sums)[R]) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < G; c += 32) {  // 16-bit pair sums of 32 columns: 8 * 2 * 15 * 127 < 32768
    __m256i low[R], high[R];
    for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_si256();
    for (int64_t k = c; k < c + 32; k += 8) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunks + k * 4));
      const __m256i low_levels = _mm256_and_si256(packed, mask);
      const __m256i high_levels = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
      for (int r = 0; r < R; ++r) {  // the levels unpacked once for R rows of x
        low[r] = _mm256_add_epi16(low[r], _mm256_maddubs_epi16(low_levels, lmgen::broadcast4(xq + r * x_stride + k)));
        high[r] = _mm256_add_epi16(high[r], _mm256_maddubs_epi16(high_levels, lmgen::broadcast4(xq + r * x_stride + k + 4)));
      }
    }
    for (int r = 0; r < R; ++r)
      sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(_mm256_add_epi16(low[r], high[r]), ones));
  }
}

// R activation rows from row m (y's rows N apart) times 8 weight rows n .. n + 7 at once, read as one
// stream (the layout interleaves their chunks), each group's 8 row sums scaled as one vector; and so
// for the S blocks of 8 rows starting at n + s * part, side by side (S streams). The weights' levels
// are unpacked once for the R rows (2 rows: 1.05-1.08x at 512 rows, 1 thread); more activation rows
// take the same weight rows one after another while those (2-6 KB a block) sit in L1.
template <int64_t G, int S, int R, typename Scale>
void dot_8_rows_int4(const QuantizedRows& x, int64_t m, int64_t K, const uint8_t* w, const Scale* scales,
                     const Scale* zeros, int64_t n, int64_t part, float* y, int64_t N) {
  const int64_t groups = K / G;
  const int8_t* xq = x.values.data() + m * K;
  const float *dx = x.scales.data() + m * groups, *sums = x.sums.data() + m * groups,
              *rounded_sums = x.rounded_sums.data() + m * groups;
  __m256 total[S][R], offset[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) total[s][r] = offset[s][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int s = 0; s < S; ++s) {
      const int64_t block = (n + s * part) / 8;
      const uint8_t* chunks = w + block * 4 * K + g * G * 4;  // a group of the block's 8 rows: 4 G bytes
      const char* ahead = reinterpret_cast<const char*>(chunks) + kPrefetchBytes;
      for (int64_t c = 0; c < G * 4; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
      __m256i summed[R];
      int4_group_sums<G, R>(chunks, xq + g * G, K, summed);
      const __m256 row_scales = load8(scales + (block * groups + g) * 8);  // the 8 rows' side by side
      const __m256 row_zeros = load8(zeros + (block * groups + g) * 8);
      for (int r = 0; r < R; ++r) {
        const int64_t at = r * groups + g;  // exact: |summed| < 2^24
        total[s][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summed[r]), _mm256_mul_ps(row_scales, _mm256_set1_ps(dx[at])),
                                      total[s][r]);
        offset[s][r] = _mm256_fmadd_ps(row_zeros, _mm256_set1_ps(sums[at]), offset[s][r]);
        offset[s][r] = _mm256_fnmadd_ps(row_scales, _mm256_set1_ps(8.0f * rounded_sums[at]), offset[s][r]);
      }
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * N + n + s * part, _mm256_add_ps(total[s][r], offset[s][r]));
}

// Calls body(std::integral_constant<int64_t, V>{}) for the V of Values equal to value, so that
// kernels get it as a compile-time constant (their loops then unroll whole).
template <int64_t... Values, typename F>
void with_constant(int64_t value, const char* error, F&& body) {
  const bool found = ((value == Values && (body(std::integral_constant<int64_t, Values>{}), true)) || ...);
  TORCH_CHECK(found, error, value);
}

// An int4 weight in the kernel's layout and its scales and zeros as op's kernel reads them.
void check_int4_weight(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), op,
              ": the weight must be a contiguous uint8 matrix (two columns per byte)");
  TORCH_CHECK(w.size(0) % 8 == 0, op, ": the weight must be a contiguous uint8 matrix in the int4 kernel's layout, ",
              "which takes rows in groups of 8, got ", w.size(0));
  TORCH_CHECK(scales.dim() == 2 && scales.sizes() == zeros.sizes() && scales.size(0) == w.size(0) &&
                  scales.is_contiguous() && zeros.is_contiguous() && scales.scalar_type() == zeros.scalar_type(),
              op, ": scales and zeros must be [N, groups] matrices of one dtype");
  TORCH_CHECK(scales.size(1) > 0 && w.size(1) * 2 % scales.size(1) == 0, op, ": the groups must divide the columns");
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros) {
  check_int4_weight(w, scales, zeros, "gemv_int4");
  const int64_t K = w.size(1) * 2, groups = scales.size(1);
  const std::vector<float> xf = float_rows(x, K, "gemv_int4");
  const int64_t M = x.size(0), N = w.size(0), G = K / groups;
  const QuantizedRows xq = quantize_rows(xf.data(), M, K, G);
  std::vector<float> sums(M * N);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  with_float_type(scales.scalar_type(), "gemv_int4", [&](auto type) {
    const auto *sp = scales.data_ptr<decltype(type)>(), *zp = zeros.data_ptr<decltype(type)>();
    with_constant<32, 64, 128, 256>(G, "gemv_int4: group size 32, 64, 128 or 256 expected, got ", [&](auto group) {
      constexpr int64_t kGroup = decltype(group)::value;
      for_each_output_range(N, 8, [&](int64_t n0, int64_t n1) {
        if (M > 1) {  // each 8 weight rows times a panel of activation rows, the weights in L1
          return by_tiles<8>(M, K, K, 1, n0, n1, [&](auto block, auto, int64_t m0, int64_t n, int64_t, int64_t, bool) {
            int64_t m = m0;
            for (; m + 2 <= m0 + block(); m += 2)
              dot_8_rows_int4<kGroup, 1, 2>(xq, m, K, wp, sp, zp, n, 0, sums.data() + m * N, N);
            if (m < m0 + block()) dot_8_rows_int4<kGroup, 1, 1>(xq, m, K, wp, sp, zp, n, 0, sums.data() + m * N, N);
          });
        }
        in_streams<kInt4Streams>(n0, n1, 8, [&](auto streams, int64_t first, int64_t part) {
          for (int64_t n = first; n < first + part; n += 8)
            dot_8_rows_int4<kGroup, decltype(streams)::value, 1>(xq, 0, K, wp, sp, zp, n, part, sums.data(), N);
        });
      });
    });
  });
  return rounded_output(sums, x, N);
}

// The float32 weight [N, K] that int8 weights stand for, w = q * scale (one rounding, as PyTorch's
// q.float() * scale), in one pass for prefill's float GEMM where PyTorch takes two and a temporary.
at::Tensor dequantize_int8(const at::Tensor& w, const at::Tensor& scales) {
  check_int8_weight(w, scales, "dequantize_int8");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  with_float_type(scales.scalar_type(), "dequantize_int8", [&](auto type) {
    const auto* sp = scales.data_ptr<decltype(type)>();
    parallel_ranges(0, N, 8, [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last; ++n) {
        const __m256 scale = _mm256_set1_ps(scalar(sp[n]));
        const int8_t* row = wp + n * K;
        float* dst = op + n * K;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
          const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
          _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), scale));
        }
        for (; k < K; ++k) dst[k] = static_cast<float>(row[k]) * scalar(sp[n]);
      }
    });
  });
  return out;
}

// The float32 weight [N, K] that int4 weights in the kernel's layout stand for: w = (q - 8) * scale +
// zero, rounded as PyTorch rounds that formula (a product, then a sum). Products these kernels do not
// take run on PyTorch's float GEMM, which wants the weight so; one pass here instead of unpacking and
// reordering it with a dozen PyTorch operators (42 vs 256 ms for bench-125m's 120 layers).
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros) {
  check_int4_weight(w, scales, zeros, "dequantize_int4");
  const int64_t N = w.size(0), K = w.size(1) * 2, groups = scales.size(1);
  TORCH_CHECK((K / groups) % 8 == 0, "dequantize_int4: groups of whole 8-column chunks expected");
  const int64_t G = K / groups;
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_float_type(scales.scalar_type(), "dequantize_int4", [&](auto type) {
    using Scale = decltype(type);
    const Scale *sp = scales.data_ptr<Scale>(), *zp = zeros.data_ptr<Scale>();
    parallel_ranges(0, N / 8, 1, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        for (int64_t c = 0; c < K / 8; ++c) {  // chunk c: row i's 4 bytes at 4 i, columns 8c + j (low), 8c + 4 + j (high)
          const uint8_t* chunk = wp + block * 4 * K + c * 32;
          const int64_t g = c * 8 / G;
          for (int i = 0; i < 8; ++i) {
            uint32_t four;
            std::memcpy(&four, chunk + 4 * i, sizeof four);
            const uint64_t levels = (four & 0x0F0F0F0Fu) | static_cast<uint64_t>((four >> 4) & 0x0F0F0F0Fu) << 32;
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(levels))));
            const int64_t row = block * 8 + i, at = (block * groups + g) * 8 + i;
            const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(8.0f)), _mm256_set1_ps(scalar(sp[at])));
            _mm256_storeu_ps(op + row * K + c * 8, _mm256_add_ps(scaled, _mm256_set1_ps(scalar(zp[at]))));
          }
        }
      }
    });
  });
  return out;
}

// exp of 8 floats to float32 precision: exp(x) = 2^n exp(r) with n = round(x / ln 2) and
// |r| <= ln(2) / 2, where exp(r)'s Taylor polynomial of degree 6 is within 2e-7. std::exp,
// one value at a time, cost more than the rest of decode attention.
inline __m256 exp8(__m256 x) {
  // exp(-87) ~ 2e-38 and exp(88) ~ 2e38: the normal floats' range
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2, with ln 2 in two parts so that n ln 2 is exact enough
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n));
}

// p[s] = exp(p[s] - largest) in place; returns {largest, the sum of the exponentials}. The largest and
// the sum are kept 8 lanes wide and reduced once: the scalar maximum and a horizontal sum per 8
// scores, each waiting on the one before, cost more than the exponentials.
std::pair<float, float> exponentiate(float* p, int64_t length) {
  const int64_t whole = length / 8 * 8;
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t s = 0; s < whole; s += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(p + s));
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  float largest = *std::max_element(lanes, lanes + 8);
  for (int64_t s = whole; s < length; ++s) largest = std::max(largest, p[s]);
  const __m256 shift = _mm256_set1_ps(largest);
  __m256 sums = _mm256_setzero_ps();
  for (int64_t s = 0; s < whole; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), shift));
    _mm256_storeu_ps(p + s, e);
    sums = _mm256_add_ps(sums, e);
  }
  float total = horizontal_sum(sums);
  for (int64_t s = whole; s < length; ++s) total += (p[s] = std::exp(p[s] - largest));
  return {largest, total};
}

// tanh of 8 floats from exp8: 1 - 2 / (exp(2x) + 1), within a few float32 ulps of std::tanh where
// it matters (|tanh| not near 0 gives the absolute error that rounding to the activations' dtype hides).
inline __m256 tanh8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp8(_mm256_add_ps(x, x));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
}

// The normalisations of the supported families (lmgen.layers.norm.NormKind), each rounding where
// transformers' formula rounds:
// kRms: Llama's RMS norm, the row normalised in float32 and rounded to x's dtype, then times the
//   weight (same dtype, rounding again);
// kRmsGainInFloat: Gemma's and OLMo 2's, the normalised row times (weight + offset) in float32,
//   rounded once (Gemma's weights are stored as w with the gain 1 + w: offset 1);
// kLayer: LayerNorm (GPT-2), (x - mean) / std * weight + bias in float32, rounded once.
enum NormKind : int64_t { kRms = 0, kRmsGainInFloat = 1, kLayer = 2 };

struct NormSpec {
  int64_t kind;
  float eps, offset;
};

// Normalisation of each row of x [M, H] with weight (and bias, kLayer) [H]. In eager PyTorch an RMS
// norm is eight operator calls (F.rms_norm is composite on a CPU) plus two dtype copies, 60 us per
// call, twice per layer. With a residual, the row normalised is x + residual (rounded to the dtype,
// as the layer's residual add is), also written to `summed`: the residual stream the next sublayer
// adds to.
template <typename T>
void normalise_rows(const T* x, const T* residual, T* summed, const T* weight, const T* bias, T* y, int64_t M,
                    int64_t H, NormSpec spec) {
  parallel_ranges(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = x + m * H;
      if (residual != nullptr) {
        T* total = summed + m * H;
        const T* other = residual + m * H;
        int64_t d = 0;
        for (; d + 8 <= H; d += 8) store8(total + d, round8(_mm256_add_ps(load8(row + d), load8(other + d)), T{}));
        for (; d < H; ++d) total[d] = static_cast<T>(scalar(row[d]) + scalar(other[d]));
        row = total;
      }
      float mean = 0.0f;
      if (spec.kind == kLayer) {
        for (int64_t d = 0; d < H; ++d) mean += scalar(row[d]);
        mean /= static_cast<float>(H);
      }
      const __m256 centre = _mm256_set1_ps(mean);
      __m256 squares = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= H; d += 8) {
        const __m256 v = _mm256_sub_ps(load8(row + d), centre);
        squares = _mm256_fmadd_ps(v, v, squares);
      }
      float total = horizontal_sum(squares);
      for (; d < H; ++d) total += (scalar(row[d]) - mean) * (scalar(row[d]) - mean);
      const float inverse = 1.0f / std::sqrt(total / static_cast<float>(H) + spec.eps);
      T* out = y + m * H;
      for (d = 0; d + 8 <= H; d += 8) {
        const __m256 normalised = _mm256_mul_ps(_mm256_sub_ps(load8(row + d), centre), _mm256_set1_ps(inverse));
        const __m256 w = load8(weight + d);
        __m256 result;
        if (spec.kind == kRms) result = _mm256_mul_ps(w, round8(normalised, T{}));
        else if (spec.kind == kRmsGainInFloat) result = _mm256_mul_ps(normalised, _mm256_add_ps(w, _mm256_set1_ps(spec.offset)));
        else result = _mm256_add_ps(_mm256_mul_ps(normalised, w), load8(bias + d));
        store8(out + d, round8(result, T{}));
      }
      for (; d < H; ++d) {
        const float normalised = (scalar(row[d]) - mean) * inverse, w = scalar(weight[d]);
        out[d] = static_cast<T>(spec.kind == kRms ? w * scalar(static_cast<T>(normalised))
                                : spec.kind == kRmsGainInFloat ? normalised * (w + spec.offset)
                                                               : normalised * w + scalar(bias[d]));
      }
    }
  });
}

NormSpec check_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    int64_t kind, double eps, double offset) {
  TORCH_CHECK(is_float_type(x.scalar_type()) && weight.scalar_type() == x.scalar_type() && weight.dim() == 1 &&
                  x.size(-1) == weight.size(0),
              "norm: x [..., H] and weight [H] must be float32, bfloat16 or float16 tensors of one dtype");
  TORCH_CHECK(kind == kRms || kind == kRmsGainInFloat || kind == kLayer, "norm: unknown kind ", kind);
  TORCH_CHECK((kind == kLayer) == bias.has_value(), "norm: a bias goes with the layer norm (kind 2) and only it");
  TORCH_CHECK(!bias || (bias->sizes() == weight.sizes() && bias->scalar_type() == x.scalar_type()),
              "norm: the bias must be [H] in x's dtype");
  return {kind, static_cast<float>(eps), static_cast<float>(offset)};
}

// y = norm(x); summed (given a residual) = x + residual, the row normalised.
void normalise(const at::Tensor& x, const at::Tensor* residual, at::Tensor* summed, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, NormSpec spec, at::Tensor& y) {
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), bc = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor rc = residual != nullptr ? residual->contiguous() : at::Tensor();
  const int64_t H = weight.size(0);
  with_float_type(x.scalar_type(), "norm", [&](auto type) {
    using T = decltype(type);
    normalise_rows(xc.data_ptr<T>(), residual != nullptr ? rc.data_ptr<T>() : nullptr,
                   summed != nullptr ? summed->data_ptr<T>() : nullptr, wc.data_ptr<T>(),
                   bias ? bc.data_ptr<T>() : nullptr, y.data_ptr<T>(), H ? xc.numel() / H : 0, H, spec);
  });
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t kind,
                double eps, double offset) {
  const NormSpec spec = check_norm(x, weight, bias, kind, eps, offset);
  at::Tensor y = at::empty(x.sizes(), x.options());
  normalise(x, nullptr, nullptr, weight, bias, spec, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, int64_t kind, double eps,
                                            double offset) {
  const NormSpec spec = check_norm(x, weight, bias, kind, eps, offset);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_norm: the residual must have x's shape and dtype");
  at::Tensor y = at::empty(x.sizes(), x.options()), summed = at::empty(x.sizes(), x.options());
  normalise(x, &residual, &summed, weight, bias, spec, y);
  return {y, summed};
}

// The MLP's activations (lmgen.layers.linear.Activation), computed in float32 as PyTorch computes
// them and rounded to x's dtype: kSilu x / (1 + exp(-x)); kGeluTanh 0.5 x (1 + tanh(sqrt(2 / pi)
// (x + 0.044715 x^3))), computed as x / (1 + exp(-2 sqrt(2 / pi) (x + 0.044715 x^3))). Gated (SwiGLU,
// GeGLU) on a fused gate/up projection x [M, 2I]: act(gate),
// rounded, times up, rounded again; else act(x) of x [M, I]. Three operator calls and a split in
// eager PyTorch. kClampedSwiglu (GPT-OSS's experts, gated): gate clamped above at `limit` and up on
// both sides, then (up + 1) * (gate * sigmoid(alpha * gate)), each operation rounded as transformers'
// runs them in x's dtype: nine operator calls.
enum ActivationKind : int64_t { kSilu = 0, kGeluTanh = 1, kClampedSwiglu = 2 };

struct ActivationSpec {
  int64_t kind;
  float alpha, limit;  // kClampedSwiglu's
};

inline __m256 activate8(__m256 x, int64_t kind) {
  if (kind == kSilu)
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
  // 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)): the same value without 1 + tanh's cancellation for x < 0
  const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 twice_inner = _mm256_mul_ps(_mm256_set1_ps(-2.0f * 0.7978845608028654f),
                                           _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f), cube)));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(twice_inner)));
}

inline float activate(float x, int64_t kind) {
  if (kind == kSilu) return x / (1.0f + std::exp(-x));
  return x / (1.0f + std::exp(-2.0f * 0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// kClampedSwiglu of 8 gates and ups already in T's precision, rounding to T after each operation.
template <typename T>
inline __m256 clamped_swiglu8(__m256 gate, __m256 up, const ActivationSpec& spec) {
  const __m256 limit = _mm256_set1_ps(spec.limit), one = _mm256_set1_ps(1.0f);
  gate = _mm256_min_ps(gate, limit);
  up = _mm256_max_ps(_mm256_min_ps(up, limit), _mm256_sub_ps(_mm256_setzero_ps(), limit));
  const __m256 scaled = round8(_mm256_mul_ps(gate, _mm256_set1_ps(spec.alpha)), T{});
  const __m256 sigmoid = round8(_mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), scaled)))), T{});
  const __m256 glu = round8(_mm256_mul_ps(gate, sigmoid), T{});
  return round8(_mm256_mul_ps(round8(_mm256_add_ps(up, one), T{}), glu), T{});
}

template <typename T>
inline float clamped_swiglu(float gate, float up, const ActivationSpec& spec) {
  auto rounded = [](float v) { return scalar(static_cast<T>(v)); };
  gate = std::min(gate, spec.limit);
  up = std::max(std::min(up, spec.limit), -spec.limit);
  const float glu = rounded(gate * rounded(1.0f / (1.0f + std::exp(-rounded(gate * spec.alpha)))));
  return rounded(rounded(up + 1.0f) * glu);
}

template <typename T>
void activate_rows(const T* x, T* y, int64_t M, int64_t I, const ActivationSpec& spec, bool gated) {
  const int64_t width = gated ? 2 * I : I, kind = spec.kind;
  parallel_ranges(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T *gate = x + m * width, *up = gate + I;
      T* out = y + m * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        if (kind == kClampedSwiglu) {
          store8(out + i, clamped_swiglu8<T>(load8(gate + i), load8(up + i), spec));
          continue;
        }
        const __m256 acted = round8(activate8(load8(gate + i), kind), T{});
        store8(out + i, gated ? round8(_mm256_mul_ps(acted, load8(up + i)), T{}) : acted);
      }
      for (; i < I; ++i) {
        if (kind == kClampedSwiglu) {
          out[i] = static_cast<T>(clamped_swiglu<T>(scalar(gate[i]), scalar(up[i]), spec));
          continue;
        }
        const float acted = scalar(static_cast<T>(activate(scalar(gate[i]), kind)));
        out[i] = static_cast<T>(gated ? acted * scalar(up[i]) : acted);
      }
    }
  });
}

at::Tensor activation(const at::Tensor& x, int64_t kind, bool gated, double alpha, double limit) {
  TORCH_CHECK(is_float_type(x.scalar_type()) && x.dim() >= 1 && (!gated || x.size(-1) % 2 == 0),
              "activation: x must be a float32, bfloat16 or float16 [..., I] tensor ([..., 2I] gated)");
  TORCH_CHECK(kind == kSilu || kind == kGeluTanh || kind == kClampedSwiglu, "activation: unknown kind ", kind);
  TORCH_CHECK(kind != kClampedSwiglu || (gated && alpha > 0 && limit > 0),
              "activation: the clamped SwiGLU is gated and needs a positive alpha and limit");
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const int64_t I = gated ? shape.back() / 2 : shape.back();
  shape.back() = I;
  at::Tensor y = at::empty(shape, xc.options());
  const ActivationSpec spec{kind, static_cast<float>(alpha), static_cast<float>(limit)};
  with_float_type(x.scalar_type(), "activation", [&](auto type) {
    using T = decltype(type);
    activate_rows(xc.data_ptr<T>(), y.data_ptr<T>(), I ? y.numel() / I : 0, I, spec, gated);
  });
  return y;
}

// Rotary position embedding of heads x [T, heads, D], whose token rows may be strided (q and
// k are a slice of the fused q/k/v projection), with cos and sin [T, R] in x's dtype over the
// first R <= D dimensions of each head (partial rotary, Phi-4-mini; the rest pass through):
// x * cos + rotate_half(x) * sin with each product and the sum rounded to x's dtype, as
// transformers computes it in that dtype. Eight operator calls per layer in eager PyTorch.
template <typename T>
void rotate_rows(const T* x, int64_t row_stride, const T* cos, const T* sin, T* y, int64_t tokens, int64_t heads,
                 int64_t D, int64_t R) {
  const int64_t half = R / 2;
  parallel_ranges(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const T* in = x + t * row_stride + h * D;
        T* out = y + (t * heads + h) * D;
        const T *c = cos + t * R, *s = sin + t * R;
        int64_t d = 0;
        for (; half % 8 == 0 && d < R; d += 8) {  // 8 at a time when no vector straddles the halves
          const __m256 rotated = d < half ? _mm256_xor_ps(load8(in + d + half), _mm256_set1_ps(-0.0f))
                                          : load8(in + d - half);
          const __m256 straight = round8(_mm256_mul_ps(load8(in + d), load8(c + d)), T{});
          const __m256 turned = round8(_mm256_mul_ps(rotated, load8(s + d)), T{});
          store8(out + d, round8(_mm256_add_ps(straight, turned), T{}));
        }
        for (; d < R; ++d) {
          const float rotated = d < half ? -scalar(in[d + half]) : scalar(in[d - half]);
          const T straight = static_cast<T>(scalar(in[d]) * scalar(c[d]));
          const T turned = static_cast<T>(rotated * scalar(s[d]));
          out[d] = static_cast<T>(scalar(straight) + scalar(turned));
        }
        std::memcpy(out + R, in + R, (D - R) * sizeof(T));
      }
    }
  });
}

// The rotary dimensions R of tables cos/sin [T, R] (or [T, 1, R]) for heads of D dimensions.
int64_t rotary_width(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t D, at::ScalarType type) {
  const int64_t R = cos.dim() ? cos.size(-1) : 0;
  TORCH_CHECK(cos.scalar_type() == type && sin.scalar_type() == type && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.numel() == T * R && sin.numel() == T * R && R % 2 == 0 && 0 < R && R <= D,
              "rotary: cos and sin must be contiguous [T, R] tensors in x's dtype, R even and at most the head size");
  return R;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && is_float_type(x.scalar_type()) && x.size(2) % 2 == 0, "rotary: x must be a float32, ",
              "bfloat16 or float16 [T, heads, D] tensor with D even");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == D, "rotary: each token's heads must be contiguous");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t R = rotary_width(c, s, T, D, x.scalar_type());
  at::Tensor y = at::empty({T, heads, D}, x.options());
  with_float_type(x.scalar_type(), "rotary", [&](auto type) {
    using E = decltype(type);
    rotate_rows(x.data_ptr<E>(), x.stride(0), c.data_ptr<E>(), s.data_ptr<E>(), y.data_ptr<E>(), T, heads, D, R);
  });
  return y;
}

// Decode attention straight from the paged KV cache: one query row per request, whose keys
// and values are read where they lie (block table), in the cache's dtype, with no gathered
// or upcast copy of the context. q: [B, H, D] float32, bfloat16 or float16; caches
// [blocks, block_size, KVH, D]; block_tables [B, max_blocks] and seq_lens [B] int64; window
// 0 = full attention, else the query (position seq_len - 1) sees the last `window` keys; softcap
// > 0 caps each scaled score at +-softcap (Gemma 2: softcap * tanh(score / softcap)); sinks [H] (GPT-OSS,
// optional): a logit per head that joins each softmax's denominator but weighs no value.
// Returns [B, H, D] in q's dtype, computed in float32.
//
// The work is cut into pieces of (request, KV head, span of positions), so that fewer
// requests x KV heads than threads still keep every thread busy (at batch 1, a model with 3
// KV heads left one of 2 threads idle a third of the time). A piece gives, for each query
// head of its group, the span's largest score, the sum of exp(score - largest) and the sum
// of those weights times the values rows; the pieces of a request's head merge exactly
// (flash-decoding's split).
struct Piece {
  int64_t request, kv_head, first, length;  // positions first .. first + length - 1
};

constexpr int64_t kMinSpan = 64;  // positions: shorter spans cost more to merge than they balance

// How many positions ahead attention asks for the key and value rows. At batch 1 they are cold
// (the weights streamed through the caches since the last step) and scattered (one head's
// row per position): fetched only when used, attention took 10-25% longer.
constexpr int64_t kPrefetchPositions = 16;

template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

struct Scratch {  // one thread's working memory, reused from piece to piece
  std::vector<float> query, scores;
  std::vector<int64_t> rows;
};

// scores[s] = scale * q . key(s) for the rows' keys, 8 positions at a time (one vector of
// 8 sums instead of 8 horizontal sums); asks ahead for the key rows, and the value rows too
// when given values (the first head's pass). q is in load16's pair order.
template <typename T>
void key_scores(const float* q, const T* k_cache, const T* v_cache, const int64_t* rows, int64_t length, int64_t D,
                float scale, float* scores) {
  auto multiply_add = [&](const T* key, int64_t d, __m256 acc) {
    __m256 first, second;
    load16(key + d, first, second);
    return _mm256_fmadd_ps(second, _mm256_loadu_ps(q + d + 8), _mm256_fmadd_ps(first, _mm256_loadu_ps(q + d), acc));
  };
  auto ask_ahead = [&](int64_t s) {
    if (s + kPrefetchPositions >= length) return;
    prefetch_row(k_cache + rows[s + kPrefetchPositions], D);
    if (v_cache != nullptr) prefetch_row(v_cache + rows[s + kPrefetchPositions], D);
  };
  int64_t s = 0;
  for (; s + 8 <= length; s += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps(), ask_ahead(s + i);
    for (int64_t d = 0; d < D; d += 16)
      for (int i = 0; i < 8; ++i) acc[i] = multiply_add(k_cache + rows[s + i], d, acc[i]);
    _mm256_storeu_ps(scores + s, _mm256_mul_ps(_mm256_set1_ps(scale), sum_each(acc)));
  }
  for (; s < length; ++s) {
    ask_ahead(s);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = multiply_add(k_cache + rows[s], d, acc);
    scores[s] = scale * horizontal_sum(acc);
  }
}

// sums[0 .. 8V) = sum_s weights[s] * value(s)[0 .. 8V), the V vectors held in registers (V even).
template <int64_t V, typename T>
void weigh_values(const float* weights, const T* v_cache, const int64_t* rows, int64_t length, float* sums) {
  __m256 acc[V];
  for (int i = 0; i < V; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t s = 0; s < length; ++s) {
    const __m256 weight = _mm256_set1_ps(weights[s]);
    for (int i = 0; i < V; i += 2) {
      __m256 first, second;
      load16(v_cache + rows[s] + 8 * i, first, second);
      acc[i] = _mm256_fmadd_ps(weight, first, acc[i]);
      acc[i + 1] = _mm256_fmadd_ps(weight, second, acc[i + 1]);
    }
  }
  float paired[8 * V];
  for (int i = 0; i < V; ++i) _mm256_storeu_ps(paired + 8 * i, acc[i]);
  for (int64_t i = 0; i < 8 * V; ++i) sums[i / 16 * 16 + pair_order<T>(i % 16)] = paired[i];
}

// Gemma 2's attention logit soft cap, in place: score = cap * tanh(score / cap).
void cap_scores(float* p, int64_t length, float cap) {
  const __m256 vcap = _mm256_set1_ps(cap);
  int64_t s = 0;
  for (; s + 8 <= length; s += 8)
    _mm256_storeu_ps(p + s, _mm256_mul_ps(tanh8(_mm256_div_ps(_mm256_loadu_ps(p + s), vcap)), vcap));
  for (; s < length; ++s) p[s] = cap * std::tanh(p[s] / cap);
}

// One piece, for the group's query heads q [group, D]: out [group, 2 + D] = per head the
// largest score, the sum of the exponentials and the weighted sum of the value rows.
template <typename T, typename Q>
void attend_span(const Q* q, const T* k_cache, const T* v_cache, const int64_t* blocks, const Piece& piece,
                 int64_t block_size, int64_t kv_heads, int64_t group, int64_t D, float scale, float softcap,
                 float* out, Scratch& scratch) {
  std::vector<float>&scores = scratch.scores, &query = scratch.query;
  std::vector<int64_t>& rows = scratch.rows;
  const int64_t length = piece.length;
  query.resize(group * D);  // the group's queries in float32 and the keys' pair order, once rather than per key
  for (int64_t i = 0; i < group * D; ++i) query[i] = scalar(q[i / 16 * 16 + pair_order<T>(i % 16)]);
  rows.resize(length);  // element offset of each position's key/value row in the caches
  int64_t block = piece.first / block_size, offset = piece.first % block_size;  // no division per position
  for (int64_t s = 0; s < length; ++s) {
    rows[s] = ((blocks[block] * block_size + offset) * kv_heads + piece.kv_head) * D;
    if (++offset == block_size) offset = 0, ++block;
  }
  scores.resize(group * length);
  for (int64_t h = 0; h < group; ++h) {
    key_scores(query.data() + h * D, k_cache, h == 0 ? v_cache : nullptr, rows.data(), length, D, scale,
               scores.data() + h * length);
    if (softcap > 0) cap_scores(scores.data() + h * length, length, softcap);
    float* head = out + h * (2 + D);
    std::tie(head[0], head[1]) = exponentiate(scores.data() + h * length, length);
    for (int64_t d = 0; d < D; d += 64) {  // the weighted sum of the value rows, 64 columns at a time
      const int64_t vectors = std::min<int64_t>(64, D - d) / 8;
      with_constant<2, 4, 6, 8>(vectors, "decode_attention: D a multiple of 16 expected, vectors ", [&](auto v) {
        weigh_values<decltype(v)::value>(scores.data() + h * length, v_cache + d, rows.data(), length,
                                         head + 2 + d);
      });
    }
  }
}

// The `count` pieces of one request's KV head, partials [count, group, 2 + D], merged into
// the group's output rows out [group, D]: each piece's sums rescaled to the largest score of all.
// sinks (GPT-OSS; null: none): the group's heads' sink logits, each one more term of its softmax's
// denominator that weighs no value row.
template <typename Q>
void merge_pieces(const float* partials, int64_t count, int64_t group, int64_t D, const float* sinks, Q* out) {
  const int64_t stride = group * (2 + D);
  std::vector<float> weights(count);
  for (int64_t h = 0; h < group; ++h) {
    const float* head = partials + h * (2 + D);
    float largest = sinks ? sinks[h] : -INFINITY;
    for (int64_t i = 0; i < count; ++i) largest = std::max(largest, head[i * stride]);
    float total = sinks ? std::exp(sinks[h] - largest) : 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      weights[i] = std::exp(head[i * stride] - largest);
      total += head[i * stride + 1] * weights[i];
    }
    for (int64_t d = 0; d < D; ++d) {
      float sum = 0.0f;
      for (int64_t i = 0; i < count; ++i) sum += weights[i] * head[i * stride + 2 + d];
      out[h * D + d] = static_cast<Q>(sum / total);
    }
  }
}

// The pieces of a batch: each request's visible positions cut into enough spans (of at least
// kMinSpan) for about two pieces per thread; first_piece [B * KVH + 1] indexes them by request and head.
std::vector<Piece> cut_into_pieces(const int64_t* lens, int64_t B, int64_t KVH, int64_t window,
                                   std::vector<int64_t>& first_piece) {
  const int64_t spans_wanted = std::max<int64_t>(1, (2 * at::get_num_threads() + B * KVH - 1) / (B * KVH));
  std::vector<Piece> pieces;
  first_piece.assign(1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1, "decode_attention: every request needs at least its query's own position");
    const int64_t first = window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0, length = lens[b] - first;
    const int64_t spans = std::min(spans_wanted, std::max<int64_t>(1, length / kMinSpan));
    const int64_t span = (length + spans - 1) / spans;
    for (int64_t kv_head = 0; kv_head < KVH; ++kv_head) {
      for (int64_t start = first; start < lens[b]; start += span)
        pieces.push_back({b, kv_head, start, std::min(span, lens[b] - start)});
      first_piece.push_back(static_cast<int64_t>(pieces.size()));
    }
  }
  return pieces;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                            double softcap, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q.dim() == 3 && is_float_type(q.scalar_type()),
              "decode_attention: q must be a float32, bfloat16 or float16 [B, H, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "decode_attention: caches must be contiguous [blocks, block_size, KVH, D] tensors of one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "decode_attention: block_tables and seq_lens must be contiguous int64 tensors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), block_size = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 16 == 0 && H % KVH == 0,
              "decode_attention: head sizes must match and be multiples of 16");
  const int64_t group = H / KVH, max_blocks = block_tables.size(1);
  TORCH_CHECK(!sinks || (sinks->dim() == 1 && sinks->size(0) == H && is_float_type(sinks->scalar_type())),
              "decode_attention: sinks must be a float tensor [H], one per query head");
  const at::Tensor sink_logits = sinks ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  const float* sink_values = sinks ? sink_logits.data_ptr<float>() : nullptr;
  const at::Tensor queries = q.contiguous();
  at::Tensor out = at::empty_like(queries);
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = seq_lens.data_ptr<int64_t>();
  std::vector<int64_t> first_piece;
  const std::vector<Piece> pieces = cut_into_pieces(lens, B, KVH, window, first_piece);
  const int64_t partial_size = group * (2 + D);
  std::vector<float> partials(pieces.size() * partial_size);
  with_float_type(k_cache.scalar_type(), "decode_attention", [&](auto type) {
    using T = decltype(type);
    const T *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
    with_float_type(q.scalar_type(), "decode_attention", [&](auto query_type) {
      using Q = decltype(query_type);
      const Q* qp = queries.data_ptr<Q>();
      Q* op = out.data_ptr<Q>();
      parallel_ranges(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
        Scratch scratch;
        for (int64_t i = begin; i < end; ++i) {
          const Piece& piece = pieces[i];
          const int64_t offset = (piece.request * H + piece.kv_head * group) * D;  // the group's heads are adjacent
          attend_span(qp + offset, kp, vp, tables + piece.request * max_blocks, piece, block_size, KVH, group, D,
                      static_cast<float>(scale), static_cast<float>(softcap), partials.data() + i * partial_size,
                      scratch);
        }
      });
      parallel_ranges(0, B * KVH, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          merge_pieces(partials.data() + first_piece[i] * partial_size, first_piece[i + 1] - first_piece[i], group,
                       D, sink_values ? sink_values + i % KVH * group : nullptr,
                       op + i * group * D);  // request i / KVH, KV head i % KVH: its group's rows
      });
    });
  });
  return out;
}


// A whole decode step's decoder layers in one call, for a few rows. Every supported family's layer
// is one sequence of the same kernels its modules call one by one (DecoderLayer.forward in
// lmgen/models/transformer.py): an optional norm before attention, q/k/v, optional q/k norms,
// rotary (on a layer's own tables, or none) and the KV cache write, attention, o, an optional norm
// after it, the residual add (optionally scaled), the same around the MLP. So the result is the
// same to the bit; what goes is ~20 operator calls per layer from Python and the Python around
// them, a third of an eager batch-1 step.
//
// What stays the same from step to step is built once into a DecodeLayers object (a TorchScript
// class, so that a step passes one handle: converting the ~540 tensors from Python took ~110 us a
// call): the model's settings by name, then each layer's tensors by name (add_layer). Names that
// are missing or unknown are errors, so that a model and these kernels cannot disagree silently.
// float weights have no scales; int8 has scales; int4 scales and zeros; GGUF blocks (uint8, no zeros)
// their layout in place of scales (ggml_blocks.h)
struct LinearOperands {
  at::Tensor weight;
  std::optional<at::Tensor> scales, zeros, bias;
};

struct NormOperands {
  at::Tensor weight;
  std::optional<at::Tensor> bias;  // LayerNorm's
};

// A mixture of experts in place of the MLP (lmgen/layers/moe.py): the experts' projections stacked
// [E, ...] (each expert's slice is a weight as product takes it), an optional gated shared expert.
struct MoeOperands {
  LinearOperands router, experts_up, experts_down;
  std::optional<LinearOperands> shared_up, shared_down, shared_gate;
  at::Tensor counts;  // tokens routed to each expert: the step adds its own (router statistics)
};

struct Layer {
  std::optional<NormOperands> input_norm, post_attention_norm, pre_mlp_norm, post_mlp_norm, q_norm, k_norm;
  LinearOperands qkv, o, up, down;  // up and down: the MLP's, undefined where the layer has experts
  std::optional<at::Tensor> sinks;  // attention's sink logits [H] (GPT-OSS)
  std::optional<MoeOperands> moe;
  at::Tensor k_cache, v_cache;
  int64_t window = 0, rotary = -1;  // rotary: which of the step's (cos, sin) pairs, -1 none
};

enum QkNorm : int64_t { kNoQkNorm = 0, kPerHead = 1, kWholeProjection = 2 };

// Takes named entries out of a dictionary; what is left at the end was not expected.
template <typename V>
struct Entries {
  c10::Dict<std::string, V> dict;
  std::string where;

  std::optional<V> optional(const std::string& key) {
    if (!dict.contains(key)) return std::nullopt;
    V value = dict.at(key);
    dict.erase(key);
    return value;
  }
  V required(const std::string& key) {
    std::optional<V> value = optional(key);
    TORCH_CHECK(value.has_value(), "DecodeLayers: ", where, " lacks ", key);
    return *value;
  }
  void finish() {
    std::string unknown;
    for (const auto& entry : dict) unknown += " " + entry.key();
    TORCH_CHECK(unknown.empty(), "DecodeLayers: ", where, " has unknown entries:", unknown);
  }
};

struct DecodeLayers : torch::CustomClassHolder {
  std::vector<Layer> layers;
  int64_t num_heads, num_kv_heads, qk_norm;
  ActivationSpec activation;
  int64_t moe_top_k;  // the MoE layers' routing (one for the model); 0: no MoE layers
  bool gated, moe_norm_topk, moe_float32_weights, moe_softmax_after_topk;
  NormSpec norm;
  double scale, softcap, residual_scale;

  explicit DecodeLayers(c10::Dict<std::string, double> settings_) {
    Entries<double> settings{std::move(settings_), "the settings"};
    num_heads = static_cast<int64_t>(settings.required("num_heads"));
    num_kv_heads = static_cast<int64_t>(settings.required("num_kv_heads"));
    norm = {static_cast<int64_t>(settings.required("norm_kind")), static_cast<float>(settings.required("norm_eps")),
            static_cast<float>(settings.required("norm_offset"))};
    qk_norm = static_cast<int64_t>(settings.required("qk_norm"));
    activation.kind = static_cast<int64_t>(settings.required("activation"));
    if (activation.kind == kClampedSwiglu) {
      activation.alpha = static_cast<float>(settings.required("swiglu_alpha"));
      activation.limit = static_cast<float>(settings.required("swiglu_limit"));
    }
    gated = settings.required("gated") != 0;
    scale = settings.required("scale");
    softcap = settings.required("softcap");
    residual_scale = settings.required("residual_scale");
    moe_top_k = static_cast<int64_t>(settings.optional("moe_top_k").value_or(0));
    moe_norm_topk = settings.optional("moe_norm_topk").value_or(0) != 0;
    moe_float32_weights = settings.optional("moe_float32_weights").value_or(0) != 0;
    moe_softmax_after_topk = settings.optional("moe_softmax_after_topk").value_or(0) != 0;
    settings.finish();
    TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && qk_norm >= kNoQkNorm &&
                    qk_norm <= kWholeProjection && norm.kind >= kRms && norm.kind <= kLayer,
                "DecodeLayers: settings out of range");
  }

  void add_layer(c10::Dict<std::string, at::Tensor> tensors_, int64_t window, int64_t rotary) {
    Entries<at::Tensor> tensors{std::move(tensors_), "layer " + std::to_string(layers.size())};
    auto linear = [&](const std::string& name) {
      return LinearOperands{tensors.required(name + ".weight"), tensors.optional(name + ".scales"),
                            tensors.optional(name + ".zeros"), tensors.optional(name + ".bias")};
    };
    auto norm_of = [&](const std::string& name) -> std::optional<NormOperands> {
      std::optional<at::Tensor> weight = tensors.optional(name + ".weight");
      if (!weight) return std::nullopt;
      return NormOperands{*weight, tensors.optional(name + ".bias")};
    };
    Layer layer;
    layer.input_norm = norm_of("input_norm");
    layer.post_attention_norm = norm_of("post_attention_norm");
    layer.pre_mlp_norm = norm_of("pre_mlp_norm");
    layer.post_mlp_norm = norm_of("post_mlp_norm");
    layer.q_norm = norm_of("q_norm");
    layer.k_norm = norm_of("k_norm");
    layer.qkv = linear("qkv");
    layer.o = linear("o");
    layer.sinks = tensors.optional("sinks");
    if (tensors.dict.contains("router.weight")) {
      auto maybe_linear = [&](const std::string& name) -> std::optional<LinearOperands> {
        if (!tensors.dict.contains(name + ".weight")) return std::nullopt;
        return linear(name);
      };
      layer.moe = MoeOperands{linear("router"), linear("experts_up"), linear("experts_down"), maybe_linear("shared_up"),
                              maybe_linear("shared_down"), maybe_linear("shared_gate"), tensors.required("moe_counts")};
      const MoeOperands& moe = *layer.moe;
      const int64_t E = moe.router.weight.size(0);
      TORCH_CHECK(moe_top_k > 0 && moe_top_k <= E, "DecodeLayers: a MoE layer needs the moe_top_k setting");
      TORCH_CHECK(moe.experts_up.weight.dim() == 3 && moe.experts_up.weight.size(0) == E &&
                      moe.experts_down.weight.dim() == 3 && moe.experts_down.weight.size(0) == E &&
                      moe.counts.scalar_type() == at::kLong && moe.counts.numel() == E,
                  "DecodeLayers: the experts must be stacked [experts, ...], one count each");
      TORCH_CHECK(moe.shared_up.has_value() == moe.shared_down.has_value() &&
                      moe.shared_up.has_value() == moe.shared_gate.has_value(),
                  "DecodeLayers: shared_up, shared_down and shared_gate go together");
    } else {
      layer.up = linear("up");
      layer.down = linear("down");
    }
    layer.k_cache = tensors.required("k_cache");
    layer.v_cache = tensors.required("v_cache");
    layer.window = window;
    layer.rotary = rotary;
    tensors.finish();
    TORCH_CHECK((qk_norm != kNoQkNorm) == (layer.q_norm.has_value() && layer.k_norm.has_value()),
                "DecodeLayers: q_norm and k_norm go together with the qk_norm setting");
    TORCH_CHECK(layer.k_cache.dim() == 4 && layer.k_cache.sizes() == layer.v_cache.sizes() &&
                    layer.k_cache.size(2) == num_kv_heads,
                "DecodeLayers: the caches must be [blocks, block_size, num_kv_heads, head_dim]");
    layers.push_back(std::move(layer));
  }
};

// n values of E stored as C's, rounded to nearest even as PyTorch's casts round: the KV cache may
// hold another dtype than the model computes in (kv_cache_dtype).
template <typename E, typename C>
void store_converted(const E* in, C* out, int64_t n) {
  if constexpr (std::is_same_v<E, C>) {
    std::memcpy(out, in, n * sizeof(E));
  } else {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(out + i, round8(load8(in + i), C{}));
    for (; i < n; ++i) out[i] = static_cast<C>(scalar(in[i]));
  }
}

// A layer's q, k and v rows [T, width] (any row stride, each row contiguous): q rotated into q_out
// [T, H, D], k rotated and v copied into each token's slot of the caches [blocks, block_size, KVH, D],
// converted to the caches' dtype: what rotary, then index_copy_ of k and of v into the caches do,
// without the views in between and their ~1-2 us of dispatch each. No tables (cos undefined): no rotary.
void rotate_into_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& q_out) {
  const int64_t T = q_out.size(0), H = q_out.size(1), D = q_out.size(2), KVH = k_cache.size(2);
  const at::ScalarType type = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == type && v.scalar_type() == type && k_cache.scalar_type() == v_cache.scalar_type() &&
                  q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1 && q.size(1) == H * D &&
                  k.size(1) == KVH * D && v.size(1) == KVH * D && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "decode_layers: the q/k/v rows and caches must fit one another");
  const int64_t R = cos.defined() ? rotary_width(cos, sin, T, D, type) : 0;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t slots_in_cache = k_cache.numel() / (KVH * D);
  with_float_type(type, "decode_layers", [&](auto element) {
    using E = decltype(element);
    const E *c = R ? cos.data_ptr<E>() : nullptr, *s = R ? sin.data_ptr<E>() : nullptr;
    rotate_rows(q.data_ptr<E>(), q.stride(0), c, s, q_out.data_ptr<E>(), T, H, D, R);
    std::vector<E> rotated(KVH * D);  // one token's keys, rotated in the model's dtype as the modules rotate them
    with_float_type(k_cache.scalar_type(), "decode_layers", [&](auto stored) {
      using C = decltype(stored);
      C *kc = k_cache.data_ptr<C>(), *vc = v_cache.data_ptr<C>();
      for (int64_t t = 0; t < T; ++t) {
        TORCH_CHECK(0 <= slots[t] && slots[t] < slots_in_cache, "decode_layers: slot ", slots[t],
                    " is not in the cache");
        rotate_rows(k.data_ptr<E>() + t * k.stride(0), k.stride(0), c ? c + t * R : c, s ? s + t * R : s,
                    rotated.data(), 1, KVH, D, R);
        store_converted(rotated.data(), kc + slots[t] * KVH * D, KVH * D);
        store_converted(v.data_ptr<E>() + t * v.stride(0), vc + slots[t] * KVH * D, KVH * D);
      }
    });
  });
}

at::Tensor product(const at::Tensor& x, const LinearOperands& linear) {
  at::Tensor y = linear.zeros                               ? gemv_int4(x, linear.weight, *linear.scales, *linear.zeros)
                 : linear.weight.scalar_type() == at::kByte ? lmgen::gemv_blocks(x, linear.weight, *linear.scales)
                 : linear.scales                            ? gemv_int8(x, linear.weight, *linear.scales)
                                                            : gemv(x, linear.weight);
  return linear.bias ? y.add(*linear.bias) : y;
}

at::Tensor normalised(const at::Tensor& x, const NormOperands& operands, NormSpec spec) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  normalise(x, nullptr, nullptr, operands.weight, operands.bias, spec, y);
  return y;
}

// (what the sublayer reads, the residual stream): x added to the stream (none before the first
// layer: x is the stream), then normalised where the layer has a norm there.
std::pair<at::Tensor, at::Tensor> add_and_norm(const at::Tensor& x, const at::Tensor& residual,
                                               const std::optional<NormOperands>& norm, NormSpec spec) {
  if (!residual.defined()) return {norm ? normalised(x, *norm, spec) : x, x};
  if (!norm) {
    at::Tensor summed = x.add(residual);
    return {summed, summed};
  }
  at::Tensor y = at::empty(x.sizes(), x.options()), summed = at::empty(x.sizes(), x.options());
  normalise(x, &residual, &summed, norm->weight, norm->bias, spec, y);
  return {y, summed};
}

// A sublayer's output as the residual stream adds it: normalised (Gemma, OLMo 2), scaled (Granite).
at::Tensor finish(const at::Tensor& out, const std::optional<NormOperands>& norm, const DecodeLayers& model) {
  const at::Tensor y = norm ? normalised(out, *norm, model.norm) : out;
  return model.residual_scale != 1.0 ? y.mul(model.residual_scale) : y;
}

at::Tensor activated(const at::Tensor& x, const ActivationSpec& spec, bool gated) {
  return activation(x, spec.kind, gated, spec.alpha, spec.limit);
}

// One expert's slice of stacked expert weights.
LinearOperands expert(const LinearOperands& stack, int64_t e) {
  auto slice = [e](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    return t ? std::optional<at::Tensor>(t->select(0, e)) : std::nullopt;
  };
  return {stack.weight.select(0, e), slice(stack.scales), slice(stack.zeros), slice(stack.bias)};
}

// A mixture of experts over x [T, hidden]: lmgen/layers/moe.py MoE.forward op for op (so the same bits).
at::Tensor mixture_of_experts(const at::Tensor& x, const MoeOperands& moe, const DecodeLayers& model) {
  const int64_t k = model.moe_top_k, E = moe.router.weight.size(0);
  const at::Tensor logits = product(x, moe.router).to(at::kFloat);
  at::Tensor top, chosen;
  if (model.moe_softmax_after_topk) {
    std::tie(top, chosen) = logits.topk(k, -1);
    top = top.softmax(-1);
  } else {
    std::tie(top, chosen) = logits.softmax(-1).topk(k, -1);
  }
  at::Tensor weights = model.moe_norm_topk ? top.div(top.sum(-1, true)) : top;
  if (!model.moe_float32_weights) weights = weights.to(x.scalar_type());
  // each (token, choice) slot, sorted by expert: its token, and how many slots each expert has
  const at::Tensor slots = chosen.flatten();
  const at::Tensor order = slots.argsort(/*stable=*/true, 0, /*descending=*/false);
  const at::Tensor counts = slots.bincount({}, E);
  moe.counts.add_(counts);
  const at::Tensor tokens = order.floor_divide(k);
  const at::Tensor rows = x.index_select(0, tokens);
  at::Tensor outputs = at::empty_like(rows);
  const int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t e = 0, start = 0; e < E; ++e) {
    if (!count[e]) continue;  // an expert no token chose is never read
    const at::Tensor up = product(rows.narrow(0, start, count[e]), expert(moe.experts_up, e));
    outputs.narrow(0, start, count[e]).copy_(product(activated(up, model.activation, true), expert(moe.experts_down, e)));
    start += count[e];
  }
  const at::Tensor weighted = outputs.mul(weights.flatten().index_select(0, order).unsqueeze(1)).to(x.scalar_type());
  at::Tensor out = at::zeros_like(x).index_add_(0, tokens, weighted);
  if (moe.shared_up) {
    const at::Tensor shared = product(activated(product(x, *moe.shared_up), model.activation, true), *moe.shared_down);
    out = out.add(product(x, *moe.shared_gate).sigmoid().mul(shared));
  }
  return out;
}

// q [T, H, D] of a layer whose keys and values are now in its caches.
void attention_inputs(const Layer& layer, const at::Tensor& x, const std::vector<at::Tensor>& rotary,
                      const at::Tensor& slot_mapping, const DecodeLayers& model, const at::Tensor& q) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = model.num_kv_heads;
  const at::Tensor qkv = product(x, layer.qkv);
  at::Tensor qs = qkv.narrow(1, 0, H * D), ks = qkv.narrow(1, H * D, KVH * D);
  if (model.qk_norm == kPerHead) {
    qs = normalised(qs.reshape({T * H, D}), *layer.q_norm, model.norm).view({T, H * D});
    ks = normalised(ks.reshape({T * KVH, D}), *layer.k_norm, model.norm).view({T, KVH * D});
  } else if (model.qk_norm == kWholeProjection) {
    qs = normalised(qs, *layer.q_norm, model.norm);
    ks = normalised(ks, *layer.k_norm, model.norm);
  }
  TORCH_CHECK(layer.rotary < 2 * static_cast<int64_t>(rotary.size()), "decode_layers: layer's rotary tables missing");
  const at::Tensor none;
  const at::Tensor& cos = layer.rotary >= 0 ? rotary[2 * layer.rotary] : none;
  const at::Tensor& sin = layer.rotary >= 0 ? rotary[2 * layer.rotary + 1] : none;
  rotate_into_cache(qs, ks, qkv.narrow(1, (H + KVH) * D, KVH * D), cos, sin, slot_mapping, layer.k_cache,
                    layer.v_cache, q);
}

// x: the step's embedded tokens [T, hidden]; rotary: (cos, sin) [T, R] of each rotary table the
// layers use. Returns (the last layer's output, the residual stream it adds to).
std::tuple<at::Tensor, at::Tensor> decode_layers(const at::Tensor& x, const std::vector<at::Tensor>& rotary,
                                                 const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                                 const at::Tensor& seq_lens,
                                                 const c10::intrusive_ptr<DecodeLayers>& handle) {
  const DecodeLayers& model = *handle;
  TORCH_CHECK(!model.layers.empty(), "decode_layers: the DecodeLayers handle has no layers");
  const int64_t T = x.size(0), H = model.num_heads, D = model.layers[0].k_cache.size(3);
  at::Tensor hidden = x, residual, q = at::empty({T, H, D}, x.options());
  with_crew([&] {
    for (const Layer& layer : model.layers) {
      auto [attention_in, stream] = add_and_norm(hidden, residual, layer.input_norm, model.norm);
      attention_inputs(layer, attention_in, rotary, slot_mapping, model, q);
      const at::Tensor attended = decode_attention(q, layer.k_cache, layer.v_cache, block_tables, seq_lens, model.scale,
                                                   layer.window, model.softcap, layer.sinks);
      hidden = finish(product(attended.view({T, H * D}), layer.o), layer.post_attention_norm, model);
      auto [mlp_in, summed] = add_and_norm(hidden, stream, layer.pre_mlp_norm, model.norm);
      residual = summed;
      const at::Tensor mlp_out = layer.moe ? mixture_of_experts(mlp_in, *layer.moe, model)
                                           : product(activated(product(mlp_in, layer.up), model.activation, model.gated),
                                                     layer.down);
      hidden = finish(mlp_out, layer.post_mlp_norm, model);
    }
  });
  return {hidden, residual};
}

}  // namespace

void lmgen::parallel_output_rows(int64_t n, int64_t unit, const std::function<void(int64_t, int64_t)>& body) {
  for_each_output_range(n, unit, body);
}

TORCH_LIBRARY(lmgen, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor w, Tensor scales, Tensor zeros) -> Tensor");
  m.def("dequantize_int8(Tensor w, Tensor scales) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scales, Tensor zeros) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int window, float softcap, Tensor? sinks=None) -> Tensor");
  m.def("norm(Tensor x, Tensor weight, Tensor? bias, int kind, float eps, float offset) -> Tensor");
  m.def("add_norm(Tensor x, Tensor residual, Tensor weight, Tensor? bias, int kind, float eps, float offset) "
        "-> (Tensor, Tensor)");
  m.def("activation(Tensor x, int kind, bool gated, float alpha=0.0, float limit=0.0) -> Tensor");
  m.class_<DecodeLayers>("DecodeLayers")
      .def(torch::init<c10::Dict<std::string, double>>())
      .def("add_layer", &DecodeLayers::add_layer);
  // writes the new K and V rows into the caches the DecodeLayers object holds
  m.def("decode_layers(Tensor x, Tensor[] rotary, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, "
        "__torch__.torch.classes.lmgen.DecodeLayers layers) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmgen, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("decode_attention", &decode_attention);
  m.impl("norm", &norm);
  m.impl("add_norm", &add_norm);
  m.impl("activation", &activation);
  m.impl("decode_layers", &decode_layers);
  m.impl("rotary", &rotary);
}
