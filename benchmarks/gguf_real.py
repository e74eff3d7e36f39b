"""The real Q4_K_M GGUF file (benchmarks/real_model.py fetches it) loaded every way, each in a process of its own.

    python benchmarks/gguf_real.py                    # every load below, then the comparisons
    python benchmarks/gguf_real.py --only lmgen-int8  # one load

For each load: the time, the model's weight bytes, the peak resident memory above the process's
baseline (after imports), the prompt ids and 32 greedy tokens for a few prompts. Then: lmgen reading the file in float32 must
give transformers' tokens for the same file (``gguf_file=``, float32), and lmgen reading it as
bfloat16 the tokens of lmgen on the float folder transformers converts it to (bfloat16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from load_memory import rss_bytes
from real_model import float_folder, gguf_file

PROMPTS = ["def quicksort(arr):", "The capital of France is", "Write a haiku about the sea."]
MAX_TOKENS = 32
LOADS = {  # name -> (loader, dtype, quantization)
    "lmgen-float32": ("lmgen", "float32", None), "lmgen-bfloat16": ("lmgen", "bfloat16", None),
    "lmgen-int8": ("lmgen", "float32", "int8"), "lmgen-int4": ("lmgen", "float32", "int4"),
    "transformers-float32": ("transformers", "float32", None), "lmgen-folder-bfloat16": ("folder", "bfloat16", None),
}
SAME = [("lmgen-float32", "transformers-float32"), ("lmgen-bfloat16", "lmgen-folder-bfloat16")]


def run_one(name: str) -> dict:
    loader, dtype, quantization = LOADS[name]
    file = gguf_file()
    if loader == "transformers":
        import torch
        import transformers

        baseline, started = rss_bytes(), time.perf_counter()
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        seconds, peak = time.perf_counter() - started, rss_bytes("VmHWM") - baseline
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        tokens = [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
                  for p in prompts]
    else:
        from lmgen import LLM, SamplingParams

        source = str(float_folder() if loader == "folder" else file)
        baseline, started = rss_bytes(), time.perf_counter()
        llm = LLM(source, dtype=dtype, quantization=quantization, kv_cache_memory="64MiB")
        seconds, peak = time.perf_counter() - started, rss_bytes("VmHWM") - baseline
        prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
        outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        tokens = [o.outputs[0].token_ids for o in outputs]
        model = llm.engine.model
    weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    return {"load_s": round(seconds, 1), "peak_rss_mib": round(peak / 2**20), "weights_mib": round(weights / 2**20),
            "prompts": prompts, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(LOADS), default=None)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only)))
        return
    size = gguf_file().stat().st_size
    print(f"file: {size / 2**20:.0f} MiB")
    results = {}
    for name in LOADS:
        out = subprocess.run([sys.executable, __file__, "--only", name], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:24s} load {r['load_s']:6.1f} s   weights {r['weights_mib']:5d} MiB   peak RSS above baseline "
              f"{r['peak_rss_mib']:5d} MiB ({r['peak_rss_mib'] * 2**20 / size:.2f}x the file)")
    for a, b in SAME:
        same = results[a]["prompts"] == results[b]["prompts"] and results[a]["tokens"] == results[b]["tokens"]
        print(f"{a} vs {b}: {'identical prompt ids and greedy tokens' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
