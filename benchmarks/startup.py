"""Start-up time: a fresh process, from its start to the first generated token, lmgen beside transformers.

    python benchmarks/startup.py                      # bench-125m, bfloat16, 3 runs each
    python benchmarks/startup.py --model PATH --dtype float32

"cold" runs after the kernel's page cache was dropped (the weights come from disk;
needs root, else it is skipped with a note); "warm" runs right after another run (the
weights are in the page cache), which is the usual case of restarting a server. Each
figure is the wall time of a whole `python -c ...` process that loads the model,
generates one token and exits, median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lmgen.bench import machine
from models import create

PROGRAMS = {
    "lmgen": ("from lmgen import LLM, SamplingParams\n"
              "LLM({path!r}, dtype={dtype!r}).generate('Hello', SamplingParams(max_tokens=1, ignore_eos=True))"),
    "transformers": ("import torch, transformers\n"
                     "model = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.{dtype})\n"
                     "tokenizer = transformers.AutoTokenizer.from_pretrained({path!r})\n"
                     "model.generate(**tokenizer('Hello', return_tensors='pt'), max_new_tokens=1, min_new_tokens=1)"),
}


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_once(system: str, path: Path, dtype: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PROGRAMS[system].format(path=str(path), dtype=dtype)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-125m", help="benchmark shape (benchmarks/models.py) or a folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = Path(args.model) if Path(args.model).is_dir() else create(args.model)
    results: dict[str, dict[str, float | None]] = {}
    for system in PROGRAMS:
        cold = []
        for _ in range(args.repeats):
            if drop_page_cache():
                cold.append(run_once(system, path, args.dtype))
        run_once(system, path, args.dtype)  # fills the page cache
        warm = [run_once(system, path, args.dtype) for _ in range(args.repeats)]
        results[system] = {"cold_s": statistics.median(cold) if cold else None, "warm_s": statistics.median(warm)}
    print(f"{path.name} {args.dtype}; process start to first token, median of {args.repeats}; {machine()}")
    for system, row in results.items():
        cold = f"{row['cold_s']:.2f} s" if row["cold_s"] is not None else "n/a (page cache not droppable)"
        print(f"{system:<13} cold {cold:<12} warm {row['warm_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
