"""The real Q4_K_M GGUF file (benchmarks/real_model.py fetches it) run with its weights in their block formats
(lmgen's default for a GGUF file on its CPU kernels) beside lmgen dequantizing it to bfloat16 and llama.cpp
(llama-cpp-python) on the same file, in one process, runs alternating.

    python benchmarks/gguf_blocks.py                 # decode and 512-token prefill, median of --repeats
    python benchmarks/gguf_blocks.py --repeats 5 --new-tokens 64

    python benchmarks/gguf_blocks.py --perplexity docs/architecture.md --max-chars 16000
    python benchmarks/gguf_blocks.py --products      # one product per block format of the file
    python benchmarks/gguf_blocks.py --memory        # peak resident memory of each system
    python benchmarks/gguf_blocks.py --kv-cache-dtype float16 [--memory]  # lmgen's KV cache in float16 beside

Figures: decode tokens/s at batch 1 (a 32-token prompt, --new-tokens greedy tokens, no EOS stop) and
prefill tokens/s of one 512-token prompt (time to the first token), each system on THREADS threads;
the same random token-id prompts for all three. Also each system's greedy tokens for a text prompt.
With --perplexity: ``lmgen perplexity``'s figure (lmgen.perplexity, windows of 512 tokens 512 apart) for
lmgen on the blocks and for llama.cpp scoring the same token ids in the same windows.
With --products: a one-row product with one tensor of each block format in the file (its blocks,
and the same tensor dequantized to bfloat16 on lmgen's float kernel), in CPU seconds of one thread
(process time: on a shared host, less disturbed by the other processes than wall time).
With --memory: each system in a fresh process loads the file, prefills 512 tokens and decodes 64 with a
KV cache of MEMORY_CONTEXT tokens; its peak resident set (VmHWM: file pages it mapped and touched count)
and that peak above the process's resident set after imports (lmgen and PyTorch, imported by both), beside
the file's size, its KV cache's and the bound of both and 300 MiB.
With --kv-cache-dtype D: lmgen on the blocks with its keys and values stored in D is one system more (in
--memory, one process more), beside lmgen's default (the model's float32) and llama.cpp (float16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import alternate, llama_generate, lmgen_generate, load_llama, random_prompts  # noqa: E402
from load_memory import rss_bytes  # noqa: E402
from real_model import gguf_file  # noqa: E402

import torch  # noqa: E402

from lmgen import LLM, SamplingParams  # noqa: E402
from lmgen.engine.config import DTYPES  # noqa: E402
from lmgen.perplexity import perplexity, windows  # noqa: E402

VOCAB = 151_000  # ordinary (non-special) ids of Qwen2.5's vocabulary
MEMORY_CONTEXT = 1024  # tokens of KV cache in --memory
KV_TOKEN_BYTES = 24 * 1024  # Qwen2.5-0.5B's keys and values of a token in float32 (llama.cpp's float16: half)
ALLOWANCE = 300 * 2**20  # issue 25's bound on peak resident memory: the file, the KV cache and this


def llama_perplexity(llama, ids: list[int], context: int, stride: int) -> float:
    """llama.cpp's logits (all positions) over lmgen.perplexity's windows: the same tokens scored."""
    import numpy as np

    total, scored = 0.0, 0
    for begin, end, first in windows(len(ids), context, stride):
        llama.reset()
        llama.eval(ids[begin:end])
        logits = np.asarray(llama.scores[first - begin - 1:end - begin - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        total += float((log_norm - logits[np.arange(end - first), ids[first:end]]).sum())
        scored += end - first
    return math.exp(total / scored)


def product_costs(file: Path, calls: int = 200) -> None:
    import time

    import torch

    from lmgen import kernels
    from lmgen.layers.ggml import BLOCK_FORMATS, row_bytes
    from lmgen.loader.gguf import GGUFCheckpoint, GGUFTensor

    kernels.load()
    torch.set_num_threads(1)
    checkpoint = GGUFCheckpoint.open(file)
    chosen = {}  # ggml type -> the first 2-D tensor of that type (not the 136M-value head or embedding)
    for info in checkpoint.tensors.values():
        if info.ggml_type in BLOCK_FORMATS and len(info.shape) == 2 and info.shape[0] < 100_000:
            chosen.setdefault(info.ggml_type, info)

    def cpu_seconds(product) -> float:
        product()
        started = time.process_time()
        for _ in range(calls):
            product()
        return (time.process_time() - started) / calls

    for ggml_type, info in sorted(chosen.items()):
        rows, columns = info.shape
        blocks = GGUFTensor(checkpoint._buffer, info, torch.float32, row_stride=row_bytes(ggml_type, columns)).load()
        dense = torch.ops.lmgen.dequantize_blocks(blocks, ggml_type, columns).bfloat16()
        layout, x = torch.tensor([[ggml_type, rows]]), torch.randn(1, columns)
        ours = cpu_seconds(lambda: torch.ops.lmgen.gemv_blocks(x, blocks, layout))
        bf16 = cpu_seconds(lambda: torch.ops.lmgen.gemv(x, dense))
        print(json.dumps({"tensor": info.name, "type": ggml_type, "shape": [rows, columns],
                          "blocks_us": round(ours * 1e6), "bfloat16_us": round(bf16 * 1e6),
                          "blocks_GB_s": round(blocks.numel() / ours / 1e9, 1),
                          "bfloat16_GB_s": round(dense.numel() * 2 / bf16 / 1e9, 1)}))


def compare_perplexity(file: Path, text: str, context: int = 512) -> None:
    blocks = LLM(str(file), kv_cache_memory="256MiB")
    ours = perplexity(blocks, text, context, context)
    llama = load_llama(file, n_ctx=context + 16, logits_all=True)
    theirs = llama_perplexity(llama, blocks.tokenizer.encode(text), context, context)
    print(json.dumps({"tokens": ours.num_tokens, "windows": ours.num_windows, "context": context,
                      "lmgen blocks": round(ours.perplexity, 4), "llama.cpp": round(theirs, 4),
                      "lmgen/llama.cpp": round(ours.perplexity / theirs, 4)}))


def peak_memory(system: str, file: Path, kv_cache_dtype: str) -> None:
    """One system's peak resident memory over a load, a 512-token prefill and 64 decoded tokens (run alone in
    its process: the peak is the process's); lmgen's keys and values stored in `kv_cache_dtype`."""
    baseline = rss_bytes()
    prompt = random_prompts(1, 512, seed=0, vocab=VOCAB)[0]
    if system == "lmgen":
        kv_bytes = MEMORY_CONTEXT * KV_TOKEN_BYTES * DTYPES.get(kv_cache_dtype, torch.float32).itemsize // 4
        llm = LLM(str(file), kv_cache_memory=kv_bytes, kv_cache_dtype=kv_cache_dtype, max_model_len=MEMORY_CONTEXT)
        lmgen_generate(llm, prompt, 64)
        system += f" KV {str(llm.engine.kv_cache_dtype).removeprefix('torch.')}"
    else:
        kv_bytes = MEMORY_CONTEXT * KV_TOKEN_BYTES // 2
        llama_generate(load_llama(file, n_ctx=MEMORY_CONTEXT), prompt, 64)
    peak = rss_bytes("VmHWM")
    print(json.dumps({"system": system, "file MiB": round(file.stat().st_size / 2**20, 1),
                      "KV MiB": kv_bytes / 2**20, "peak RSS MiB": round(peak / 2**20, 1),
                      "peak above baseline MiB": round((peak - baseline) / 2**20, 1),
                      "bound MiB": round((file.stat().st_size + kv_bytes + ALLOWANCE) / 2**20, 1)}))


def compare_memory(file: Path, kv_cache_dtype: str | None) -> None:
    import subprocess

    for system, kv in (("lmgen", "auto"), ("lmgen", kv_cache_dtype), ("llama.cpp", "auto")):
        if kv is not None:
            subprocess.run([sys.executable, __file__, "--memory-of", system, "--kv-cache-dtype", kv], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--perplexity", type=Path, default=None, help="a UTF-8 text file: perplexity only")
    parser.add_argument("--max-chars", type=int, default=16000, help="of the perplexity text")
    parser.add_argument("--products", action="store_true", help="one product per block format only")
    parser.add_argument("--memory", action="store_true", help="peak resident memory of each system only")
    parser.add_argument("--memory-of", choices=["lmgen", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache-dtype", default=None,
                        help="also lmgen on the blocks with its KV cache in this dtype (float16, bfloat16)")
    args = parser.parse_args()
    file = gguf_file()
    if args.memory_of:
        peak_memory(args.memory_of, file, args.kv_cache_dtype)
        return
    if args.memory:
        compare_memory(file, args.kv_cache_dtype)
        return
    if args.products:
        product_costs(file)
        return
    if args.perplexity:
        compare_perplexity(file, args.perplexity.read_text()[:args.max_chars])
        return
    blocks = LLM(str(file), kv_cache_memory="256MiB")
    bf16 = LLM(str(file), dtype="bfloat16", kv_cache_memory="256MiB")
    other_kv = None if args.kv_cache_dtype is None else LLM(str(file), kv_cache_memory="256MiB",
                                                            kv_cache_dtype=args.kv_cache_dtype)
    llama = load_llama(file, n_ctx=1024)
    text = blocks.tokenizer.encode("def quicksort(arr):")
    greedy = SamplingParams(max_tokens=24, temperature=0)
    lmgens = {"lmgen blocks": blocks, "lmgen bfloat16": bf16, f"lmgen blocks KV {args.kv_cache_dtype}": other_kv}
    print("greedy tokens of a text prompt:", json.dumps({
        **{name: llm.generate([text], greedy)[0].outputs[0].token_ids for name, llm in lmgens.items() if llm is not None},
        "llama.cpp": llama_generate(llama, text, 24)[1]}))
    for figure, prompt_len, new_tokens in (("decode_tok_s", 32, args.new_tokens), ("prefill_tok_s", 512, 2)):
        runs = {"lmgen blocks": lambda p: lmgen_generate(blocks, p, new_tokens),
                "lmgen bfloat16": lambda p: lmgen_generate(bf16, p, new_tokens),
                "llama.cpp": lambda p: llama_generate(llama, p, new_tokens)[0]}
        if other_kv is not None:
            runs[f"lmgen blocks KV {args.kv_cache_dtype}"] = lambda p: lmgen_generate(other_kv, p, new_tokens)
        alternate(runs, random_prompts(1, 16, seed=99, vocab=VOCAB))  # warm-up
        results = alternate(runs, random_prompts(args.repeats, prompt_len, seed=0, vocab=VOCAB))
        medians = {name: statistics.median(getattr(r, figure) for r in rs) for name, rs in results.items()}
        print(json.dumps({"figure": figure, "prompt_len": prompt_len, "load_average": round(os.getloadavg()[0], 1),
                          **{name: round(value, 2) for name, value in medians.items()},
                          "blocks/llama.cpp": round(medians["lmgen blocks"] / medians["llama.cpp"], 2),
                          "blocks/bfloat16": round(medians["lmgen blocks"] / medians["lmgen bfloat16"], 2)}))


if __name__ == "__main__":
    main()
