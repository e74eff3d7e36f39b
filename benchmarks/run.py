"""Every speed figure of docs/performance.md, lmgen beside transformers in one run.

    python benchmarks/run.py                 # creates bench-125m if needed, then measures
    python benchmarks/run.py --quick         # fewer tokens and repeats, for a smoke run

Each row is one `lmgen bench` call (see `lmgen bench --help`); JSON lands in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmgen.cli import main as lmgen
from models import create

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model = str(create("bench-125m"))
    RESULTS.mkdir(exist_ok=True)
    new_tokens, repeats = ("16", "1") if args.quick else ("128", "3")
    common = ["--model", model, "--new-tokens", new_tokens, "--repeats", repeats, "--compare", "transformers"]
    for dtype in ("bfloat16", "float32"):
        lmgen(["bench", "latency", "--dtype", dtype, *common, "--json", str(RESULTS / f"latency-{dtype}.json")])
    lmgen(["bench", "latency", "--dtype", "bfloat16", "--sizes", "1", "--prompt-len", "512", *common,
           "--json", str(RESULTS / "prefill-512-bfloat16.json")])
    lmgen(["bench", "prefix", "--model", model, "--dtype", "bfloat16", "--prompt-len", "1024", "--repeats", repeats,
           "--json", str(RESULTS / "prefix-1024-bfloat16.json")])
    lmgen(["bench", "throughput", "--dtype", "bfloat16", "--sizes", "1", "4", "16", "64", *common,
           "--max-num-batched-tokens", "2048", "--json", str(RESULTS / "throughput-bfloat16.json")])


if __name__ == "__main__":
    main()
