"""lmgen's llama.cpp recipes (quantization="q4_k_m") beside llama.cpp's own quantization of the same float weights.

    python benchmarks/recipe_quality.py --model /path/to/float-folder [--json out.json]

The float folder is written as an f32 GGUF (benchmarks/llamacpp.py's converter) and quantized by
llama.cpp (`llama_model_quantize`, Q4_K_M), cached in benchmarks/models/. Then, one process, each
variant loaded in turn: the float folder; llama.cpp's Q4_K_M file (lmgen runs its blocks); the folder
with lmgen's q4_k_m, int4 (groups of 32 and 64): perplexity (lmgen.perplexity: the first 8,000
characters of a text, windows of 512 tokens, stride 512; every variant on the folder's tokens, the file
too, whose converted vocabulary splits the text a little differently), bits per weight of the layers' linear
weights (the LM head and embedding apart), whether q4_k_m's blocks equal the file's byte for byte,
load seconds and decode tokens at batch 1 per second of the process's CPU time (rough).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from llamacpp import convert, quantize_with_llama_cpp  # noqa: E402

from lmgen import LLM, SamplingParams  # noqa: E402
from lmgen.layers.ggml import GGMLLinear  # noqa: E402
from lmgen.layers.ggml_quant import BLOCK_SIZES  # noqa: E402
from lmgen.layers.quant import QuantizedLinear  # noqa: E402
from lmgen.loader.tokenizer import Tokenizer  # noqa: E402
from lmgen.perplexity import perplexity  # noqa: E402

TEXT = Path("/usr/share/common-licenses/GPL-3")
CHARACTERS = 8000


def layer_bits(llm: LLM) -> float:
    """Bits per weight of the transformer layers' linear weights (block padding of fused layers not counted)."""
    bits = values = 0
    for name, module in llm.engine.model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(module, GGMLLinear):
            for ggml_type, rows in module.layout.tolist():
                per_block, nbytes = BLOCK_SIZES[ggml_type]
                bits += rows * module.in_features // per_block * nbytes * 8
                values += rows * module.in_features
        elif isinstance(module, QuantizedLinear):
            bits += sum(p.nbytes for p in module.parameters(recurse=False) if p is not module.bias) * 8
            values += module.out_features * module.in_features
        elif type(module).__name__ in ("Linear", "FusedLinear"):
            bits += module.weight.nbytes * 8
            values += module.weight.numel()
    return bits / values


def decode_tok_s(llm: LLM, tokens: int = 32) -> float:
    """Tokens per second of the process's CPU time (its threads' together): on a shared host, others'
    load adds no descheduled time to it, unlike the wall clock."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=4, temperature=0))  # warm up
    started = time.process_time()
    llm.generate(["def fibonacci(n):"], params)
    return tokens / (time.process_time() - started)


def measure(name: str, source: Path, text: str, folder: Path, **kwargs) -> tuple[dict, LLM]:
    started = time.perf_counter()
    llm = LLM(str(source), kv_cache_memory="256MiB", **kwargs)
    load_s = time.perf_counter() - started
    llm.engine.tokenizer = Tokenizer.from_pretrained(folder)
    result = perplexity(llm, text, 512, 512)
    row = {"variant": name, "perplexity": result.perplexity, "tokens": result.num_tokens,
           "windows": result.num_windows, "bits_per_weight": layer_bits(llm), "load_s": load_s,
           "decode_tok_per_cpu_s": decode_tok_s(llm)}
    print(json.dumps(row), flush=True)
    return row, llm


def same_blocks(ours: LLM, theirs: LLM) -> tuple[int, int]:
    """(block layers of `ours` whose types and bytes equal `theirs`', block layers of `ours`)."""
    mine = {n: m for n, m in ours.engine.model.named_modules() if isinstance(m, GGMLLinear)}
    file = {n: m for n, m in theirs.engine.model.named_modules() if isinstance(m, GGMLLinear)}
    return sum(n in file and m.types == file[n].types and torch.equal(m.weight, file[n].weight)
               for n, m in mine.items()), len(mine)


VARIANTS = ("float", "file", "q4_k_m", "int4-g32", "int4-g64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a float checkpoint folder")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cache = ROOT / "models"
    cache.mkdir(exist_ok=True)
    f32, q4km = cache / f"{args.model.name}-f32.gguf", cache / f"{args.model.name}-q4_k_m.gguf"
    if not f32.is_file():
        convert(args.model, "f32", f32)
    if not q4km.is_file():
        quantize_with_llama_cpp(f32, "q4_k_m", q4km)
    text = TEXT.read_text()[:CHARACTERS]
    sources = {"float": ("float", args.model, {}), "file": ("llama.cpp Q4_K_M file", q4km, {}),
               "q4_k_m": ("lmgen q4_k_m", args.model, {"quantization": "q4_k_m"}),
               **{f"int4-g{g}": (f"lmgen int4 g{g}", args.model, {"quantization": "int4", "quantization_group_size": g})
                  for g in (32, 64)}}
    rows, loaded = [], {}
    for variant in args.only:
        name, source, kwargs = sources[variant]
        row, llm = measure(name, source, text, args.model, **kwargs)
        if variant in ("file", "q4_k_m"):
            loaded[variant] = llm
        if len(loaded) == 2:
            row["identical_block_layers"], row["block_layers"] = same_blocks(loaded.pop("q4_k_m"), loaded.pop("file"))
            print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
