"""How fast PyTorch reads weights in one-row products (GEMV), the core of batch-1 decode.

    python benchmarks/gemv.py

Random weights of bench-125m's shapes (30 layers of q/k/v, o, gate/up and down, and the
32000-row tied head), each multiplied by one activation row, in float32 and bfloat16,
several ways (lmgen's own kernel first). GB/s = weight bytes / time for one pass over all of them: a pass is what a
decode step must read, so this is the ceiling of any decode step built on that product.
Compare with the machine's DRAM read rate (benchmarks/llamacpp.py measures it).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from lmgen import kernels

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(32000, 576)]


def multiply_and_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w.float() * x.float()).sum(-1).to(x.dtype)


WAYS = {
    "lmgen's kernel (lmgen.kernels)": (lambda x, w: torch.ops.lmgen.gemv(x.float(), w), lambda w: w),
    "F.linear": (lambda x, w: F.linear(x, w), lambda w: w),
    "torch.mv": (lambda x, w: torch.mv(w, x[0]), lambda w: w),
    "x @ w, w stored [in, out]": (lambda x, w: x @ w, lambda w: w.t().contiguous()),
    "torch.compile multiply-and-sum": (torch.compile(multiply_and_sum, dynamic=True), lambda w: w),
}


def gigabytes_per_s(product, prepare, dtype: torch.dtype, repeats: int = 10) -> float:
    weights = [prepare(torch.randn(rows, cols).to(dtype)) for rows, cols in SHAPES]
    inputs = {cols: torch.randn(1, cols).to(dtype) for _, cols in SHAPES}
    seconds = []
    for _ in range(repeats + 2):  # the first two warm up (and compile)
        started = time.perf_counter()
        for (_, cols), weight in zip(SHAPES, weights):
            product(inputs[cols], weight)
        seconds.append(time.perf_counter() - started)
    nbytes = sum(rows * cols for rows, cols in SHAPES) * dtype.itemsize
    return nbytes / statistics.median(seconds[2:]) / 1e9


def main() -> None:
    if not kernels.load():
        del WAYS["lmgen's kernel (lmgen.kernels)"]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, (product, prepare) in WAYS.items():
            with torch.inference_mode():
                print(f"{str(dtype):>15} {name:>32}: {gigabytes_per_s(product, prepare, dtype):5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
