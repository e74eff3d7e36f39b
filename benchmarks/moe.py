"""Batch-1 decode of a mixture of experts beside the dense model of its active parameters, taking turns.

    python benchmarks/moe.py                      # qwen3-moe-1b-a150m vs qwen3-150m, bfloat16
    python benchmarks/moe.py --quantization int4 --threads 1

Both checkpoints come from benchmarks/models.py (random weights). Each round times one greedy
request of --new-tokens tokens on each model in turn, so both see the same load on a shared
machine; the time per token (fastest and median round) and their ratio are printed, with how
evenly the router spread the tokens over the experts (lmgen.layers.moe.tokens_per_expert).
On a machine busier than its cores, --threads 1 gives steadier figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmgen import LLM, SamplingParams
from lmgen.layers.moe import tokens_per_expert
from models import create


def decode_ms(llm: LLM, new_tokens: int, seed: int) -> float:
    """Milliseconds per decoded token of one request: the time after the first token over the tokens after it."""
    prompt = torch.randint(3, 32000, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([prompt], first)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return (time.perf_counter() - start - prefill) * 1000 / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe", default="qwen3-moe-1b-a150m")
    parser.add_argument("--dense", default="qwen3-150m")
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llms = {name: LLM(str(create(name)), dtype="bfloat16", quantization=args.quantization, enable_prefix_caching=False)
            for name in (args.dense, args.moe)}
    figures: dict[str, list[float]] = {name: [] for name in llms}
    for round_ in range(args.rounds):
        for name, llm in llms.items():
            figures[name].append(decode_ms(llm, args.new_tokens, seed=round_))
    for name, values in figures.items():
        print(f"{name}: {min(values):.1f} ms/token fastest, {statistics.median(values):.1f} median "
              f"(rounds {', '.join(f'{v:.1f}' for v in values)})")
    moe, dense = figures[args.moe], figures[args.dense]
    print(f"time per token, {args.moe} / {args.dense}: {min(moe) / min(dense):.2f}x fastest, "
          f"{statistics.median(moe) / statistics.median(dense):.2f}x median")
    counts = torch.stack(list(tokens_per_expert(llms[args.moe].engine.model).values())).float()
    print(f"tokens per expert per layer: mean {counts.mean():.0f}, min {counts.min():.0f}, max {counts.max():.0f}")


if __name__ == "__main__":
    main()
