"""The drop-in surface's speed: lmgen's `model.generate` against transformers' on the same inputs.

    python benchmarks/dropin_generate.py                       # bench-125m, bfloat16, batch 1 and 8
    python benchmarks/dropin_generate.py --compile --json out.json

The same code runs against both libraries (only the import differs, as for a user who
ports): a batch of random 128-token prompts, 128 new tokens with EOS ignored
(min_new_tokens), greedy and then do_sample with top_p=0.9. The two systems alternate,
a new batch of prompts each repeat; the figure is generated tokens per second over the
whole `generate` call (prefill included), median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

import lmgen
from lmgen.bench import machine
from models import create

MODES = {"greedy": dict(do_sample=False), "top_p=0.9": dict(do_sample=True, top_p=0.9, temperature=1.0)}


def tokens_per_s(model, input_ids: torch.Tensor, new_tokens: int, mode: dict) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0, **mode)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return input_ids.shape[0] * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="lmgen with its compiled decode step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = str(create("bench-125m"))
    dtype = getattr(torch, args.dtype)
    systems = {"lmgen": lmgen.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, compile=args.compile),
               "transformers": transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        for mode_name, mode in MODES.items():
            runs = {name: [] for name in systems}
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                ids = torch.randint(3, 32000, (size, args.prompt_len), generator=generator)
                for name in (list(systems) if repeat % 2 else list(systems)[::-1]):
                    rate = tokens_per_s(systems[name], ids, args.new_tokens, mode)
                    if repeat:
                        runs[name].append(rate)
            row = {"batch": size, "mode": mode_name, **{name: statistics.median(r) for name, r in runs.items()}}
            row["ratio"] = row["lmgen"] / row["transformers"]
            rows.append(row)
            print(f"batch {size:>2} {mode_name:>9}: lmgen {row['lmgen']:6.1f} tok/s, transformers "
                  f"{row['transformers']:6.1f} tok/s, {row['ratio']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "dtype": args.dtype, "compile": args.compile, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
