"""How far quantized greedy generations follow the full-precision model's.

    python benchmarks/demo_heldout.py        # the prompts: beginnings of held-out documents
    python benchmarks/greedy_agreement.py    # demo model, bfloat16 vs int8 and int4

For each prompt (the first --prompt-tokens tokens of a held-out document), generates
--new-tokens greedy tokens with the bfloat16 model and each quantized one, and reports
the share of generated tokens that match position by position, how many tokens match
before the first difference (mean), and how many generations are identical throughout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmgen import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def leading_matches(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--text", type=Path, default=RESULTS / "demo-heldout.txt")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quantize", nargs="+", default=["int8", "int4"])
    parser.add_argument("--group-size", type=int, default=None)
    args = parser.parse_args()

    reference = LLM(args.model, dtype="bfloat16")
    documents = [d for d in args.text.read_text(encoding="utf-8").split("\n\n") if d.strip()][: args.prompts]
    prompts = [reference.tokenizer.encode(d)[: args.prompt_tokens] for d in documents]
    expected = generate(reference, prompts, args.new_tokens)
    for method in args.quantize:
        llm = LLM(args.model, dtype="bfloat16", quantization=method, quantization_group_size=args.group_size)
        got = generate(llm, prompts, args.new_tokens)
        same = sum(x == y for e, g in zip(expected, got) for x, y in zip(e, g))
        leading = [leading_matches(e, g) for e, g in zip(expected, got)]
        print(f"{method}: {same / (len(prompts) * args.new_tokens):.1%} of tokens match bfloat16 position by "
              f"position; {sum(leading) / len(leading):.1f} of {args.new_tokens} before the first difference "
              f"(mean); {sum(n == args.new_tokens for n in leading)}/{len(prompts)} generations identical")


if __name__ == "__main__":
    main()
