"""Speculative decoding by prompt lookup on a model that really copies its input, beside decoding
without it and beside transformers' own prompt lookup: `lmgen bench speculative` on
Qwen2.5-Coder-0.5B-Instruct, with the speculative settings as flags.

    python benchmarks/real_model.py             # once: Qwen2.5-Coder-0.5B-Instruct as a float folder
    python benchmarks/speculative.py            # editing and free tasks, batch 1 and 8
    python benchmarks/speculative.py --disable-by-batch-size 0   # draft at every batch size

The tasks and figures are lmgen.bench_speculative's (its docstring says what each measures).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # run from a checkout without installing lmgen

from lmgen.bench import machine, report  # noqa: E402
from lmgen.bench_speculative import speculative_rows  # noqa: E402

MODEL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--k", type=int, default=5, help="num_speculative_tokens (and transformers' lookup)")
    parser.add_argument("--lookup-max", type=int, default=3, help="prompt_lookup_max")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--disable-by-batch-size", type=int, default=1,
                        help="no drafts while more requests than this run (0: draft at every batch size)")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    speculative = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
                   "disable_by_batch_size": args.disable_by_batch_size or None}
    print(f"{Path(args.model).name} {args.dtype}, greedy, {args.new_tokens} new tokens, {speculative}; {machine()}")
    rows = speculative_rows(args.model, {"dtype": args.dtype, "speculative_config": speculative}, args.batches,
                            args.new_tokens, None if args.no_transformers else "transformers")
    report(rows, None, "speculative")


if __name__ == "__main__":
    main()
