"""The median time of one decode step, over hundreds of steps: an A/B yardstick steadier
than whole runs on a shared machine.

    python benchmarks/step_time.py --dtype bfloat16 --batch 1 [--quantization int8] [--compile]
    python benchmarks/step_time.py --prefill 512 --threads 1 --clock cpu   # one 512-token prefill

Runs `batch` requests of 128 prompt tokens through lmgen's engine (bench-125m by default),
times every engine step after the prefill (scheduling, the forward, sampling and output
included) and prints the median, the 10th percentile and the tokens/s the median gives.
With ``--prefill N`` it times instead the one step that prefills a new N-token prompt (N at
most the engine's 512 tokens a step), 20 times. ``--clock cpu`` times the process's CPU time:
with ``--threads 1``, the work a step costs even while other processes take the core away.
Compare two versions of the code by running this alternately, a few times each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lmgen import LLM, SamplingParams


def step_times(llm: LLM, batch: int, steps: int, first_token: int, prompt_len: int = 128,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each decode step of `batch` new requests (the first two steps, prefill, left out)."""
    return all_step_times(llm, batch, steps, first_token, prompt_len, clock)[2:]


def all_step_times(llm: LLM, batch: int, steps: int, first_token: int, prompt_len: int,
                   clock: Callable[[], float]) -> list[float]:
    params = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0)
    for i in range(batch):  # prompts of their own: no prefix-cache hit shortens a prefill
        llm.engine.add_request(list(range(first_token + prompt_len * i, first_token + prompt_len * (i + 1))), params)
    times = []
    while llm.engine.has_unfinished_requests():
        started = clock()
        llm.engine.step()
        times.append(clock() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/bench-125m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--prefill", type=int, metavar="N", help="time the prefill of one N-token prompt instead")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, compile=args.compile)
    step_times(llm, args.batch, 40, first_token=100)  # warm-up (and compiling)
    if args.prefill:
        ms = sorted(1000 * all_step_times(llm, 1, 1, 20000 + args.prefill * i, args.prefill, clock)[0]
                    for i in range(20))
        median = statistics.median(ms)
        print(f"{args.dtype} {args.quantization or ''} prefill of {args.prefill} tokens ({args.clock} clock): median "
              f"{median:.1f} ms, p10 {ms[2]:.1f} ms -> {1000 * args.prefill / median:.0f} tok/s")
        return
    ms = sorted(1000 * t for t in step_times(llm, args.batch, args.steps, first_token=5000, clock=clock))
    median = statistics.median(ms)
    print(f"{args.dtype} {args.quantization or ''} batch {args.batch} {'compiled' if args.compile else 'eager'}: "
          f"step median {median:.2f} ms, p10 {ms[len(ms) // 10]:.2f} ms -> {1000 * args.batch / median:.1f} tok/s")


if __name__ == "__main__":
    main()
