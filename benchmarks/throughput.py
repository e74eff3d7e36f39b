"""Offline throughput, lmgen beside transformers in one run: N prompts at once.

    python benchmarks/throughput.py                       # N = 1, 4, 16, 64; bfloat16
    python benchmarks/throughput.py --num-prompts 16 --dtype float32

Each prompt has --prompt-len tokens and generates exactly --new-tokens (EOS ignored).
lmgen takes all N as one continuous batch; transformers runs them as static batches
of --hf-batch (default N) with left padding. Generated tokens/s over the whole run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import machine
from models import create


def prompts_for(n: int, length: int) -> list[list[int]]:
    return [[(7 * i + 13 * j + 11) % 3000 + 3 for i in range(length)] for j in range(n)]


def run_lmgen(llm, prompts, new_tokens: int) -> float:
    from lmgen import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return len(prompts) * new_tokens / elapsed


def run_transformers(model, prompts, new_tokens: int, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch])  # equal lengths: no padding needed
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--num-prompts", type=int, action="append")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=None, help="transformers' static batch size (default: N)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    path = create(args.model)

    from lmgen import LLM

    llm = LLM(str(path), dtype=args.dtype, max_num_seqs=64, max_num_batched_tokens=1024)
    hf = None
    if not args.skip_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    run_lmgen(llm, prompts_for(2, 16), 4)  # warm-up
    print(f"{args.model} {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens; {machine()}")
    print(f"{'N':>4}{'lmgen tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    rows = []
    for n in args.num_prompts or [1, 4, 16, 64]:
        prompts = prompts_for(n, args.prompt_len)
        ours = sorted(run_lmgen(llm, prompts, args.new_tokens) for _ in range(args.repeats))[args.repeats // 2]
        theirs = None
        if hf is not None:
            theirs = sorted(run_transformers(hf, prompts, args.new_tokens, args.hf_batch or n)
                            for _ in range(args.repeats))[args.repeats // 2]
        ratio = f"{ours / theirs:7.2f}x" if theirs else ""
        print(f"{n:>4}{ours:>14.1f}{theirs or float('nan'):>20.1f}{ratio:>8}", flush=True)
        rows.append({"num_prompts": n, "lmgen_tok_s": round(ours, 1),
                     "transformers_tok_s": theirs and round(theirs, 1)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "dtype": args.dtype, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
