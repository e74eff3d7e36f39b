"""Decode with the model split over two ranks (tensor_parallel_size=2) beside one rank, and the time rank 0
spends in collectives per step.

    python benchmarks/tensor_parallel.py --model benchmarks/models/tinyllama-1.1b
    python benchmarks/tensor_parallel.py --model PATH --device cuda      # on two GPUs

One rank runs first with every core; then two ranks with half the cores each (on a CPU) or a GPU
each. For the split model, rank 0's all-reduces, broadcasts (each step's batch, the hidden rows
for logits) and logits gathers are timed, waits for the other rank included, and reported per
engine step: what splitting costs beyond the arithmetic it shares out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch.distributed as dist

from lmgen import LLM
from lmgen.bench import PROMPTS, lmgen_run


def timed_collectives(llm: LLM) -> dict[str, float]:
    """Seconds in each collective of rank 0 and engine steps (key "steps"), counted from now on."""
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


def measure(llm: LLM, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    vocab = llm.engine.model.spec.vocab_size
    lmgen_run(llm, PROMPTS.take(batch, prompt_len, vocab), 4)  # warm-up
    return statistics.median(lmgen_run(llm, PROMPTS.take(batch, prompt_len, vocab), new_tokens).decode_tok_s
                             for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates = {}
    for size in (1, 2):
        llm = LLM(args.model, device=args.device, dtype=args.dtype, tensor_parallel_size=size)
        totals = timed_collectives(llm) if size > 1 else None
        for batch in args.batches:
            if totals is not None:
                totals.clear()
            rates[size, batch] = measure(llm, batch, args.prompt_len, args.new_tokens, args.repeats)
            line = f"TP={size} batch {batch}: {rates[size, batch]:.1f} decode tok/s"
            if totals is not None:
                per_step = {name: 1000 * seconds / totals["steps"] for name, seconds in totals.items() if name != "steps"}
                line += (f" ({rates[size, batch] / rates[1, batch]:.2f}x TP=1); per step, ms in all-reduce "
                         f"{per_step['all_reduce']:.2f}, broadcast {per_step['broadcast']:.2f}, "
                         f"gather {per_step['gather']:.2f}")
            print(line, flush=True)
        llm.engine.close()


if __name__ == "__main__":  # a spawned worker imports this module: it must not run main
    main()
