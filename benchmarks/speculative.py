"""Speculative decoding by prompt lookup, beside decoding without it and beside transformers' own.

    python benchmarks/real_model.py             # once: Qwen2.5-Coder-0.5B-Instruct as a float folder
    python benchmarks/speculative.py            # editing task and free task, batch 1 and 8

Two tasks on a model that really copies its input (Qwen2.5-Coder-0.5B-Instruct, greedy):
"edit" asks to rename a variable in a function of lmgen's own source and give the whole function
back, so most of the output repeats the prompt; "free" asks for new prose, which repeats little.
For each, lmgen without speculation, lmgen with `speculative_config={"method": "ngram", ...}`, and
(batch 1) transformers' `generate(prompt_lookup_num_tokens=...)`, one run each, in that order.
Decode tokens/s counts the tokens after the first over the time after the first.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # run from a checkout without installing lmgen

from lmgen import LLM, SamplingParams  # noqa: E402

MODEL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct"
SOURCES = ["lmgen/engine/speculative.py", "lmgen/models/transformer.py", "lmgen/engine/scheduler.py",
           "lmgen/layers/rotary.py", "lmgen/cache/block_pool.py", "lmgen/engine/request.py",
           "lmgen/layers/norm.py", "lmgen/models/contract.py"]


def _function(path: str) -> tuple[str, str]:
    """The first function of a source file that takes an argument (its first 25 lines), and that argument."""
    text = (ROOT.parent / path).read_text()
    for match in re.finditer(r"\n *def \w+\(([^)]*)\)", text):
        names = [n for n in re.findall(r"(\w+)\s*(?:[:,=]|$)", match.group(1)) if n not in ("self", "cls")]
        if names:
            body = textwrap.dedent("\n".join(text[match.start() + 1:].split("\n")[:25]))
            return body, names[0]
    raise ValueError(f"{path} has no function with an argument")


def edit_prompts(count: int) -> list[list[dict]]:
    prompts = []
    for path in (SOURCES * count)[:count]:
        body, name = _function(path)
        prompts.append([{"role": "user", "content": f"Rename `{name}` to `{name}_new` in this Python code and "
                                                    f"return all of it, changing nothing else:\n\n```python\n"
                                                    f"{body}\n```"}])
    return prompts


def free_prompts(count: int) -> list[list[dict]]:
    topics = ["a lighthouse keeper", "a city under the sea", "the first day of spring", "a clockmaker's apprentice",
              "a journey by train", "an old library", "a mountain village", "a lost letter"]
    return [[{"role": "user", "content": f"Write a short original story about {topic}."}]
            for topic in (topics * count)[:count]]


def lmgen_run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    started, first, counts = time.perf_counter(), None, 0
    for delta in llm.stream(prompts, params):
        counts += len(delta.outputs[0].token_ids)
        if first is None and counts:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": counts, "decode_tok_s": (counts - len(prompts)) / (end - first), "seconds": end - started}


def transformers_run(model, prompt: list[int], new_tokens: int, lookup: int) -> dict:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, prompt_lookup_num_tokens=lookup)
        end = time.perf_counter()
    tokens = out.shape[1] - len(prompt)
    # the second call prefills again: take its prefill (the first call's time) off
    return {"tokens": tokens, "decode_tok_s": (tokens - 1) / (end - first - (first - started)),
            "seconds": end - first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens (and transformers' lookup)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--disable-by-batch-size", type=int, default=None,
                        help="speculative_config's (default: none here, so every batch size drafts)")
    args = parser.parse_args()
    fast = LLM(args.model, dtype="bfloat16", enable_prefix_caching=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 3,
                                   "disable_by_batch_size": args.disable_by_batch_size})
    plain = LLM(args.model, dtype="bfloat16", enable_prefix_caching=False)
    hf = None
    if not args.no_transformers:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    print(f"{Path(args.model).name} bfloat16, greedy, {args.new_tokens} new tokens, k={args.k}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'task':6} {'batch':>5} {'system':28} {'decode tok/s':>12} {'ratio':>6} {'accepted':>9}")
    for task, make in (("edit", edit_prompts), ("free", free_prompts)):
        for batch in args.batches:
            prompts = [plain.tokenizer.encode_chat(m, add_generation_prompt=True) for m in make(batch)]
            lmgen_run(plain, [prompts[0][:16]], 4)  # warm both engines (kernels, first allocations)
            lmgen_run(fast, [prompts[0][:16]], 4)
            base = lmgen_run(plain, prompts, args.new_tokens)
            drafted, accepted = fast.engine.num_draft_tokens, fast.engine.num_accepted_draft_tokens
            spec = lmgen_run(fast, prompts, args.new_tokens)
            drafts = fast.engine.num_draft_tokens - drafted
            rate = f"{(fast.engine.num_accepted_draft_tokens - accepted) / drafts:.0%}" if drafts else "no drafts"
            rows = [("lmgen", base, ""), ("lmgen prompt lookup", spec, rate)]
            if hf is not None and batch == 1:
                rows.append(("transformers prompt lookup", transformers_run(hf, prompts[0], args.new_tokens, args.k),
                             ""))
            for system, figures, note in rows:
                ratio = figures["decode_tok_s"] / base["decode_tok_s"]
                print(f"{task:6} {batch:>5} {system:28} {figures['decode_tok_s']:>12.1f} {ratio:>5.2f}x {note:>9}")


if __name__ == "__main__":
    main()
