"""Batch-1 latency, lmgen beside transformers, in one run: time to first token and decode tokens/s.

    python benchmarks/decode.py                       # bench-125m, bfloat16 and float32
    python benchmarks/decode.py --dtype float32 --repeats 5

Greedy, prompt 128 tokens, 128 new tokens (EOS ignored), median of --repeats runs.
Decode tokens/s counts the tokens after the first over the time after the first.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import Timer, machine
from models import create


def lmgen_run(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    from lmgen import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    first = None
    for _ in llm.stream([prompt], params):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


def transformers_run(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        with Timer() as first:
            model.generate(ids, max_new_tokens=1, do_sample=False)
        with Timer() as total:
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return first.seconds, (new_tokens - 1) / (total.seconds - first.seconds)


def measure(system: str, dtype: str, path, prompt, new_tokens: int, repeats: int) -> dict:
    if system == "lmgen":
        from lmgen import LLM

        runner, run = LLM(str(path), dtype=dtype), lmgen_run
    else:
        import transformers

        runner = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        run = transformers_run
    run(runner, prompt, 8)  # warm-up
    results = [run(runner, prompt, new_tokens) for _ in range(repeats)]
    ttft = sorted(r[0] for r in results)[len(results) // 2]
    decode = sorted(r[1] for r in results)[len(results) // 2]
    return {"system": system, "dtype": dtype, "ttft_s": round(ttft, 4), "decode_tok_s": round(decode, 2),
            "runs_decode_tok_s": [round(r[1], 2) for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float32"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    path = create(args.model)
    prompt = [(7 * i + 11) % 3000 + 3 for i in range(args.prompt_len)]
    rows = []
    print(f"{args.model}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; {machine()}")
    print(f"{'system':<14}{'dtype':<10}{'TTFT s':>9}{'decode tok/s':>14}{'ratio':>8}")
    for dtype in args.dtype or ["bfloat16", "float32"]:
        pair = [measure(system, dtype, path, prompt, args.new_tokens, args.repeats)
                for system in ("transformers", "lmgen")]
        for row in pair:
            row["ratio_vs_transformers"] = round(row["decode_tok_s"] / pair[0]["decode_tok_s"], 2)
            print(f"{row['system']:<14}{dtype:<10}{row['ttft_s']:>9.3f}{row['decode_tok_s']:>14.1f}"
                  f"{row['ratio_vs_transformers']:>7.2f}x")
        rows += pair
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
