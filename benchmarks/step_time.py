"""The median time of one decode step, over hundreds of steps: an A/B yardstick steadier
than whole runs on a shared machine.

    python benchmarks/step_time.py --dtype bfloat16 --batch 1 [--quantization int8] [--compile]

Runs `batch` requests of 128 prompt tokens through lmgen's engine (bench-125m by default),
times every engine step after the prefill (scheduling, the forward, sampling and output
included) and prints the median, the 10th percentile and the tokens/s the median gives.
Compare two versions of the code by running this alternately, a few times each.
"""

from __future__ import annotations

import argparse
import statistics
import time

from lmgen import LLM, SamplingParams


def step_times(llm: LLM, batch: int, steps: int, first_token: int) -> list[float]:
    """Seconds of each decode step of `batch` new requests (the first two steps, prefill, left out)."""
    params = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0)
    for i in range(batch):  # prompts of their own: no prefix-cache hit shortens a prefill
        llm.engine.add_request(list(range(first_token + 128 * i, first_token + 128 * (i + 1))), params)
    times = []
    while llm.engine.has_unfinished_requests():
        started = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - started)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/bench-125m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, compile=args.compile)
    step_times(llm, args.batch, 40, first_token=100)  # warm-up (and compiling)
    ms = sorted(1000 * t for t in step_times(llm, args.batch, args.steps, first_token=5000))
    median = statistics.median(ms)
    print(f"{args.dtype} {args.quantization or ''} batch {args.batch} {'compiled' if args.compile else 'eager'}: "
          f"step median {median:.2f} ms, p10 {ms[len(ms) // 10]:.2f} ms -> {1000 * args.batch / median:.1f} tok/s")


if __name__ == "__main__":
    main()
