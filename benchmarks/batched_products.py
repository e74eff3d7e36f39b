"""Products of many activation rows (batched decode, prompt chunks): lmgen's kernels against
PyTorch's GEMM, side by side in one process.

    python benchmarks/batched_products.py [--rows 1 16 64 128 256 512] [--repeats 5]

Random weights of one bench-125m layer's shapes (q/k/v, o, gate/up, down) times M activation
rows, for each weight kind: lmgen's kernel (``torch.ops.lmgen.gemv*``) and the PyTorch path
lmgen takes without it (float32 GEMM, half-precision weights upcast to float32 each call as
lmgen.layers.linear does; int8/int4 dequantized to float32, then the GEMM, as prefill did).
Prints each way's time for the layer's four products and PyTorch's time over lmgen's (> 1:
lmgen faster); GFLOP/s counts 2 M N K per product. The ways alternate within each repeat,
so a machine whose load moves still compares them at the same moment, and each way's fastest
repeat counts: on a shared machine the others' load only ever adds time. ``--clock cpu`` times
the process's CPU time instead of the wall clock: with ``--threads 1``, the work a product costs
even while other processes take the core away (the figure for comparing kernels on a busy host).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmgen import kernels
from lmgen.layers.quant import interleave_int4, quantize_int4, quantize_int8

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in): q/k/v, o, gate/up, down
Product = Callable[[torch.Tensor], torch.Tensor]


def ways(kind: str, weight: torch.Tensor) -> dict[str, Product]:
    """lmgen's kernel and PyTorch's path for one weight of `kind`, each taking rows [M, K]."""
    if kind in ("float32", "bfloat16", "float16"):
        w = weight.to(getattr(torch, kind))
        return {"lmgen": lambda x: torch.ops.lmgen.gemv(x, w),
                "pytorch": lambda x: F.linear(x.float(), w.float()).to(x.dtype)}
    if kind == "int8":
        q, scales = quantize_int8(weight)
        return {"lmgen": lambda x: torch.ops.lmgen.gemv_int8(x, q, scales),
                "pytorch": lambda x: F.linear(x.float(), torch.ops.lmgen.dequantize_int8(q, scales)).to(x.dtype)}
    operands = interleave_int4(*quantize_int4(weight, 64))
    return {"lmgen": lambda x: torch.ops.lmgen.gemv_int4(x, *operands),
            "pytorch": lambda x: F.linear(x.float(), torch.ops.lmgen.dequantize_int4(*operands)).to(x.dtype)}


def seconds(products: list[Product], inputs: list[torch.Tensor], clock: Callable[[], float]) -> float:
    started = clock()
    for product, x in zip(products, inputs):
        product(x)
    return clock() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128, 256, 512])
    parser.add_argument("--kinds", nargs="+", default=["float32", "bfloat16", "float16", "int8", "int4"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    if not kernels.load():
        raise SystemExit(f"lmgen's kernels are off: {kernels.why_not}")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"ms ({args.clock} clock) for one layer's 4 products")
    torch.manual_seed(0)
    weights = [torch.randn(shape) / shape[1] ** 0.5 for shape in SHAPES]
    for kind in args.kinds:
        by_weight = [ways(kind, w) for w in weights]
        dtype = torch.float32 if kind in ("float32", "int8", "int4") else getattr(torch, kind)
        for rows in args.rows:
            inputs = [torch.randn(rows, k).to(dtype) for _, k in SHAPES]
            times: dict[str, list[float]] = {name: [] for name in by_weight[0]}
            with torch.inference_mode():
                for repeat in range(args.repeats + 1):  # the first warms up
                    for name in (times if repeat % 2 else reversed(list(times))):
                        times[name].append(seconds([way[name] for way in by_weight], inputs, clock))
            ms = {name: min(t[1:]) * 1e3 for name, t in times.items()}
            flops = sum(2 * rows * n * k for n, k in SHAPES)
            print(f"{kind:>8} M={rows:<4} lmgen {ms['lmgen']:8.2f} ms ({flops / ms['lmgen'] / 1e6:5.1f} GFLOP/s)  "
                  f"pytorch {ms['pytorch']:8.2f} ms  pytorch/lmgen {ms['pytorch'] / ms['lmgen']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
