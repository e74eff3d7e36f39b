"""How much faster int8 and int4 weights decode than bfloat16, with the engines taking turns in
one process: a steadier figure for issue 6's "int8 >= 1.3x, int4 >= 1.8x lmgen bf16" than two
rows of a benchmark timed a minute apart, on a machine whose load moves from minute to minute.

    python benchmarks/quant_speedup.py [--batch 1] [--rounds 10] [--steps 34]

Loads bench-125m (benchmarks/models.py) in bfloat16, int8 and int4 side by side, then for each
round times a block of decode steps on each engine in turn (the order alternating) and takes
each quantized engine's median step time over bfloat16's in that round. Prints the median and
range of those ratios as speed-ups (bf16 time / quantized time) and each engine's tok/s.
"""

from __future__ import annotations

import argparse
import statistics

from step_time import step_times

from lmgen import LLM

KINDS = [None, "int8", "int4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/bench-125m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=34, help="decode steps timed per engine and round")
    args = parser.parse_args()
    engines = {kind: LLM(args.model, dtype="bfloat16", quantization=kind) for kind in KINDS}
    for llm in engines.values():
        step_times(llm, args.batch, 40, first_token=100)  # warm-up
    medians: dict[str | None, list[float]] = {kind: [] for kind in KINDS}
    first_token = 1000
    for round_ in range(args.rounds):
        for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
            medians[kind].append(statistics.median(step_times(engines[kind], args.batch, args.steps, first_token)))
            first_token += 128 * args.batch  # fresh prompts: no prefix-cache hit
    print(f"bench-125m, batch {args.batch}, {args.rounds} rounds of {args.steps} steps per engine")
    for kind in KINDS:
        print(f"  {kind or 'bfloat16':9s} {args.batch / statistics.median(medians[kind]):7.1f} tok/s")
    for kind in KINDS[1:]:
        speedups = [bf16 / quantized for bf16, quantized in zip(medians[None], medians[kind])]
        print(f"  {kind} / bfloat16: {statistics.median(speedups):.2f}x "
              f"(rounds {min(speedups):.2f}-{max(speedups):.2f})")


if __name__ == "__main__":
    main()
