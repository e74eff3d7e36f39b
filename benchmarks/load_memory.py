"""Resident memory while loading a checkpoint and decoding, above the process's baseline.

    python benchmarks/load_memory.py                      # bench-125m, bfloat16
    python benchmarks/load_memory.py --quantize int4      # quantized while loading
    python benchmarks/load_memory.py --model qwen3-moe-1b-a150m --map-weights --decode 64

The baseline is taken after importing lmgen and torch; the KV cache is kept tiny so
the figure is the loader's alone. Targets: at most 1.3x the weight bytes (issue 2);
with int4, below the bfloat16 weight size (issue 6). With `--decode N`, the resident
memory after computing one token (a one-token prompt), then after decoding N more
(batch 1, greedy; benchmarks/mapped_decode.py times decoding). With `--map-weights` (memory-mapped weights, issue 27) the
first run prepares the mapped file: run twice, the second run is the mapped load;
resident memory is split into anonymous and file-backed pages (the mapped weights,
which the OS may drop again).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from models import create


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS), its peak so far (VmHWM), or its anonymous (RssAnon) or
    file-backed (RssFile) part, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident(baseline: dict[str, int]) -> str:
    return ", ".join(f"{field} {(rss_bytes(field) - base) / 2**20:.0f}" for field, base in baseline.items()) + " MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-125m", help="a bench model's name, or a checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--map-weights", action="store_true")
    parser.add_argument("--decode", type=int, default=0, metavar="N", help="then decode N tokens (batch 1)")
    args = parser.parse_args()
    path = Path(args.model) if Path(args.model).is_dir() else create(args.model)

    from lmgen import LLM, SamplingParams

    baseline = {field: rss_bytes(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    started = time.perf_counter()
    llm = LLM(str(path), dtype=args.dtype, kv_cache_memory="8MiB", quantization=args.quantize,
              quantization_group_size=args.group_size, map_weights=args.map_weights)
    load_s = time.perf_counter() - started
    peak = rss_bytes("VmHWM") - baseline["VmRSS"]
    weights = sum(p.nbytes for p in llm.engine.model.parameters())
    label = f"{path.name} {args.dtype} {args.quantize or ''}{' mapped' if args.map_weights else ''}"
    print(f"{label}: weights {weights / 2**20:.1f} MiB, loaded in {load_s:.1f} s, peak RSS above baseline while "
          f"loading {peak / 2**20:.1f} MiB = {peak / weights:.2f}x the weights")
    if not args.decode:
        return
    print(f"  after loading: {resident(baseline)}")
    llm.generate([[1]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    print(f"  after one token: {resident(baseline)}")
    llm.generate([[1]], SamplingParams(max_tokens=args.decode + 1, temperature=0, ignore_eos=True))
    print(f"  after {args.decode} more: {resident(baseline)}")


if __name__ == "__main__":
    main()
