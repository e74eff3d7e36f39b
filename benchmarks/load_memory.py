"""Peak resident memory while loading a checkpoint, above the process's baseline.

    python benchmarks/load_memory.py            # bench-125m, bfloat16

The baseline is taken after importing lmgen and torch; the KV cache is kept tiny so
the figure is the loader's alone. The target (issue 2): at most 1.3x the weight bytes.
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
    args = parser.parse_args()
    path = create(args.model)

    from lmgen import LLM

    baseline = rss_bytes()
    llm = LLM(str(path), dtype=args.dtype, kv_cache_memory="8MiB")
    peak = rss_bytes("VmHWM") - baseline
    weights = sum(p.nbytes for p in llm.engine.model.parameters())
    print(f"{args.model} {args.dtype}: weights {weights / 2**20:.0f} MiB, peak RSS above baseline while loading "
          f"{peak / 2**20:.0f} MiB = {peak / weights:.2f}x the weights")


if __name__ == "__main__":
    main()
