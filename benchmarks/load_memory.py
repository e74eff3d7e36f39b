"""Peak resident memory while loading a checkpoint, above the process's baseline.

    python benchmarks/load_memory.py                      # bench-125m, bfloat16
    python benchmarks/load_memory.py --quantize int4      # quantized while loading

The baseline is taken after importing lmgen and torch; the KV cache is kept tiny so
the figure is the loader's alone. Targets: at most 1.3x the weight bytes (issue 2);
with int4, below the bfloat16 weight size (issue 6).
"""

from __future__ import annotations

import argparse

from models import create


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--group-size", type=int, default=None)
    args = parser.parse_args()
    path = create(args.model)

    from lmgen import LLM

    baseline = rss_bytes()
    llm = LLM(str(path), dtype=args.dtype, kv_cache_memory="8MiB", quantization=args.quantize,
              quantization_group_size=args.group_size)
    peak = rss_bytes("VmHWM") - baseline
    weights = sum(p.nbytes for p in llm.engine.model.parameters())
    print(f"{args.model} {args.dtype} {args.quantize or ''}: weights {weights / 2**20:.1f} MiB, peak RSS above "
          f"baseline while loading {peak / 2**20:.1f} MiB = {peak / weights:.2f}x the weights")


if __name__ == "__main__":
    main()
