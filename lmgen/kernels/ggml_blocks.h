// What cpu.cpp and ggml_blocks.cpp (one library) take from each other.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace lmgen {

// body(first, last) over output rows [0, n), one contiguous range per thread: on the threads of a
// running decode_layers call (its crew), else on PyTorch's (cpu.cpp).
void parallel_output_rows(int64_t n, const std::function<void(int64_t, int64_t)>& body);

// x [M, K] times a weight stored in GGUF blocks (ggml_blocks.cpp): blocks uint8 [N, row stride],
// layout int64 [parts, 2] of (ggml type, rows), the parts' rows stacked in order.
at::Tensor gemv_blocks(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& layout);

}  // namespace lmgen
