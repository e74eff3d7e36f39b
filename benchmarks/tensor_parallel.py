"""Decode with the model split over two ranks (tensor_parallel_size=2) beside one rank, taking turns, and
what the all-reduces cost per step.

    python benchmarks/models.py --shape qwen3-150m
    python benchmarks/tensor_parallel.py --model benchmarks/models/qwen3-150m

Both engines live in this process (the split one's second rank in a worker process) and take turns,
round after round, so both see the same load on a shared machine; one rank runs with all the cores'
threads, and again with one thread (what one core does alone), each of the two ranks with half. For the split model, rank 0's all-reduces, broadcasts (each
step's batch, the hidden rows for logits) and logits gathers are timed per engine step, waits for the
other rank included. Beside them, two bare gloo processes time one all-reduce of a step's
[batch, hidden] activations, with no model around it: the communication alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmgen import LLM
from lmgen.bench import PROMPTS, lmgen_run


def timed_collectives(llm: LLM) -> dict[str, float]:
    """Seconds in each of rank 0's collectives, and engine steps (key "steps"), counted from now on."""
    totals: dict[str, float] = defaultdict(float)
    for name in ("all_reduce", "broadcast", "gather"):
        original = getattr(dist, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - start
        setattr(dist, name, timed)
    execute = llm.engine.runner.execute

    def counted(*args, **kwargs):
        totals["steps"] += 1
        return execute(*args, **kwargs)
    llm.engine.runner.execute = counted
    return totals


def _bare_all_reduce(rank: int, rendezvous: str, shapes: list[tuple[int, int]], repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    for shape in shapes:
        x = torch.ones(shape)
        for _ in range(10):
            dist.all_reduce(x)
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        if rank == 0:
            results.put((shape, (time.perf_counter() - start) / repeats))
    dist.destroy_process_group()


def bare_all_reduce_ms(shapes: list[tuple[int, int]], repeats: int = 2000) -> dict[tuple[int, int], float]:
    """Milliseconds per float32 all-reduce of each shape between two gloo processes on this machine."""
    context = mp.get_context("spawn")
    results = context.Queue()
    rendezvous = f"file://{Path(tempfile.mkdtemp()) / 'store'}"
    processes = [context.Process(target=_bare_all_reduce, args=(rank, rendezvous, shapes, repeats, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    found = dict(results.get() for _ in shapes)
    for process in processes:
        process.join()
    return {shape: 1000 * seconds for shape, seconds in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    one = LLM(args.model, device="cpu", dtype="float32")
    spec = one.engine.model.spec
    per_layer = bare_all_reduce_ms([(batch, spec.hidden_size) for batch in args.batches])
    two = LLM(args.model, device="cpu", dtype="float32", tensor_parallel_size=2)
    totals = timed_collectives(two)
    runs = {"TP=1": (one, cores), "TP=1, 1 thread": (one, 1), "TP=2": (two, cores // 2)}
    for batch in args.batches:
        rates, per_step = defaultdict(list), defaultdict(list)
        for _ in range(args.rounds):
            for name, (llm, threads) in runs.items():
                torch.set_num_threads(threads)
                prompts = PROMPTS.take(batch, args.prompt_len, spec.vocab_size)
                totals.clear()
                rates[name].append(lmgen_run(llm, prompts, args.new_tokens).decode_tok_s)
            for name in ("all_reduce", "broadcast", "gather"):
                per_step[name].append(1000 * totals[name] / totals["steps"])
        one_rate, two_rate = statistics.median(rates["TP=1"]), statistics.median(rates["TP=2"])
        bare = per_layer[batch, spec.hidden_size] * (2 * spec.num_layers + 1)
        print(f"batch {batch}: TP=1 {one_rate:.1f} (1 thread: {statistics.median(rates['TP=1, 1 thread']):.1f}), "
              f"TP=2 {two_rate:.1f} decode tok/s ({two_rate / one_rate:.2f}x); "
              f"TP=2 per step, ms: all-reduce {statistics.median(per_step['all_reduce']):.2f} (bare gloo: "
              f"{2 * spec.num_layers + 1} x {per_layer[batch, spec.hidden_size]:.3f} = {bare:.2f}), broadcast "
              f"{statistics.median(per_step['broadcast']):.2f}, gather {statistics.median(per_step['gather']):.2f}",
              flush=True)
    two.engine.close()


if __name__ == "__main__":  # a spawned worker imports this module: it must not run main
    main()
