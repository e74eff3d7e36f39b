"""A mixture of experts' GGUF file run with its experts in their block formats (lmgen's default on its CPU
kernels) beside lmgen dequantizing the same file to bfloat16 and llama.cpp (llama-cpp-python) on the file;
with --folder, also lmgen loading the float folder the file was made from with llama.cpp's recipe
(quantization=--recipe: the same blocks, quantized while loading).

    python benchmarks/gguf_moe.py                  # benchmarks/models/qwen3-moe-1b-a150m-q4_0.gguf
    python benchmarks/gguf_moe.py --model benchmarks/models/qwen3-moe-1b-a150m-q4_k_m.gguf --threads 1 --clock cpu
    python benchmarks/gguf_moe.py --model benchmarks/models/qwen3-moe-1b-a150m-q4_k_m.gguf \
        --folder benchmarks/models/qwen3-moe-1b-a150m --systems "lmgen recipe" "lmgen blocks" llama.cpp

Each system runs in a fresh process: it loads the file, then decodes --new-tokens greedy tokens after a
32-token random prompt, --repeats times. Printed: the median decode tokens/s, the load time, the peak
resident memory (VmHWM: the file's pages it touched count) and that peak above the resident set after the
imports, beside the file's size. (benchmarks/llamacpp.py --shape qwen3-moe-1b-a150m makes the q4_0 file;
llama.cpp's quantizer makes the Q4_K_M one from the f32 file: llamacpp.quantize_with_llama_cpp.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import CLOCKS, THREADS, llama_generate, lmgen_generate, load_llama, random_prompts  # noqa: E402
from load_memory import rss_bytes  # noqa: E402

SYSTEMS = ("lmgen blocks", "lmgen bfloat16", "llama.cpp", "lmgen recipe")
DEFAULT_MODEL = Path("benchmarks/models/qwen3-moe-1b-a150m-q4_0.gguf")


def measure(system: str, file: Path, args: argparse.Namespace) -> None:
    """One system's load, decode and peak memory, in this process."""
    import torch

    from lmgen import LLM

    torch.set_num_threads(args.threads)
    baseline, started = rss_bytes(), time.perf_counter()
    if system == "llama.cpp":
        llama = load_llama(file, n_ctx=256, threads=args.threads)
        run = lambda prompt: llama_generate(llama, prompt, args.new_tokens, CLOCKS[args.clock])[0]  # noqa: E731
    else:
        source, how = ((args.folder, {"quantization": args.recipe}) if system == "lmgen recipe" else
                       (file, {"dtype": "bfloat16" if system == "lmgen bfloat16" else "auto"}))  # auto: the blocks
        llm = LLM(str(source), kv_cache_memory="64MiB", max_model_len=256, **how)
        run = lambda prompt: lmgen_generate(llm, prompt, args.new_tokens, CLOCKS[args.clock])  # noqa: E731
    load_s = time.perf_counter() - started
    warm_up, *prompts = random_prompts(args.repeats + 1, 32, seed=0)
    run(warm_up)
    decode = statistics.median(run(prompt).decode_tok_s for prompt in prompts)
    peak = rss_bytes("VmHWM")
    print(json.dumps({"system": system, "file MiB": round(file.stat().st_size / 2**20, 1),
                      "decode_tok_s": round(decode, 2), "load_s": round(load_s, 1),
                      "peak RSS MiB": round(peak / 2**20, 1),
                      "peak above imports MiB": round((peak - baseline) / 2**20, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a mixture of experts' GGUF file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--folder", type=Path, help="the float folder the file was made from ('lmgen recipe')")
    parser.add_argument("--recipe", choices=["q4_k_m", "q6_k", "q8_0"], default="q4_k_m")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, help="default: all (the recipe with --folder)")
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one system, in this process
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"no GGUF file at {args.model}")
    args.systems = args.systems or list(SYSTEMS if args.folder else SYSTEMS[:-1])
    if "lmgen recipe" in args.systems and args.folder is None:
        parser.error("system 'lmgen recipe' loads --folder")
    if args.system:
        measure(args.system, args.model, args)
        return
    for system in args.systems:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--system", system], check=True)


if __name__ == "__main__":
    main()
