"""Decode steps with the weights memory-mapped (``map_weights=True``) beside the same model loaded into
memory, side by side in one process: alternating rounds of batch-1 decode steps of each, the median step.

    python benchmarks/mapped_decode.py --model benchmarks/models/qwen3-moe-1b-a150m
    python benchmarks/mapped_decode.py --threads 1 --clock cpu   # CPU time: steadier on a shared host

The mapped model's first round reads its pages from the page cache (or disk) as the experts are
first chosen, and is shown apart; the later rounds compare resident pages with memory of lmgen's own
(huge pages where the OS gives them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_time import step_times

from lmgen import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/qwen3-moe-1b-a150m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--steps", type=int, default=40, help="decode steps a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    engines = {mapped: LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory="64MiB",
                           map_weights=mapped) for mapped in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for mapped, llm in engines.items():
            steps = step_times(llm, 1, args.steps, first_token=3 + round_ * 128, clock=clock)
            if mapped and round_ == 0:
                print(f"mapped, first round (pages read as first used): median step "
                      f"{statistics.median(steps) * 1e3:.1f} ms")
            else:
                times[mapped] += steps
    for mapped, steps in times.items():
        median = statistics.median(steps)
        print(f"{'mapped   ' if mapped else 'in memory'}: median step {median * 1e3:.1f} ms = {1 / median:.1f} tok/s "
              f"({len(steps)} steps, {args.clock} clock, {args.threads} threads)")


if __name__ == "__main__":
    main()
