"""Which dtype arithmetic runs in, given the dtype tensors are stored in.

CPUs without bf16/fp16 units (AVX2 machines) run half-precision GEMM and attention
kernels several times slower than float32, so there half precision is a storage
format: products of several rows and attention are computed in float32 and rounded
back, which is also what native half-precision kernels do inside (fp32 accumulation).
"""

from __future__ import annotations

import torch

# Asked once, at import: the answers never change, and a compiled forward must not call
# these queries (they are opaque to torch.compile and would split its graph).
_NATIVE_ON_CPU = {torch.bfloat16: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                  torch.float16: bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}


def native_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU has fast kernels for `dtype`."""
    return _NATIVE_ON_CPU.get(dtype, True)


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 for half precision on a CPU that lacks units for it, else `dtype` itself."""
    if device.type == "cpu" and not native_on_cpu(dtype):
        return torch.float32
    return dtype
