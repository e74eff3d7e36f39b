"""The cost of structured output: decode-step time constrained vs free, and time to first token with a new schema.

    python benchmarks/structured.py                          # bench-125m, bfloat16, batch 1 and 16
    python benchmarks/structured.py --model PATH --dtype float32 --sizes 1 4

Both runs decode the same number of model steps per request; the constrained one masks
every row with a JSON schema of realistic shape (records with strings, enums, numbers
and arrays). Tokens the grammar forces are appended without a model step, so the
constrained run reports them apart. Prints a table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lmgen import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "customers": {"type": "array", "minItems": 50, "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                "plan": {"enum": ["free", "pro", "enterprise"]},
                "balance": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
            },
            "required": ["name", "email", "age", "plan", "balance", "tags"],
            "additionalProperties": False,
        }},
    },
    "required": ["customers"],
    "additionalProperties": False,
}
PROMPT = "Export the customer table as JSON."


def decode(llm: LLM, batch: int, new_tokens: int, structured: dict | None) -> dict:
    """Seconds per model step and tokens per second for `batch` requests decoding `new_tokens` tokens each."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=0, structured=structured)
    steps = 0
    execute = llm.engine.runner.execute

    def counted(*args):
        nonlocal steps
        steps += 1
        return execute(*args)

    llm.engine.runner.execute = counted
    try:
        started = time.perf_counter()
        outputs = llm.generate([PROMPT] * batch, params)
        elapsed = time.perf_counter() - started
    finally:
        llm.engine.runner.execute = execute
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"step_s": elapsed / steps, "tokens_per_s": tokens / elapsed, "steps": steps, "tokens": tokens}


def first_token_latency(llm: LLM, structured: dict | None) -> float:
    """Seconds from the call to the first delta (closing the stream then aborts the request)."""
    started = time.perf_counter()
    stream = llm.stream(PROMPT, SamplingParams(max_tokens=64, structured=structured))
    next(stream)
    elapsed = time.perf_counter() - started
    stream.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/bench-125m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype)
    spec = {"json_schema": SCHEMA}
    ttft = {"free": first_token_latency(llm, None),  # also warms the model up
            "first schema (with tokenizer set-up)": first_token_latency(llm, spec),
            "new schema": first_token_latency(llm, {"json_schema": {**SCHEMA, "title": "new"}}),
            "free again": first_token_latency(llm, None)}
    rows = []
    for batch in args.sizes:
        for name, structured in (("free", None), ("json_schema", spec)):
            runs = [decode(llm, batch, args.new_tokens, structured) for _ in range(args.repeats)]
            rows.append({"batch": batch, "mode": name, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    print(f"{'batch':>5} {'mode':>12} {'ms/step':>9} {'tok/s':>8} {'steps':>6} {'tokens':>7}")
    for row in rows:
        print(f"{row['batch']:>5} {row['mode']:>12} {row['step_s'] * 1e3:>9.1f} {row['tokens_per_s']:>8.1f} "
              f"{row['steps']:>6.0f} {row['tokens']:>7.0f}")
    for free, constrained in zip(rows[::2], rows[1::2]):
        print(f"batch {free['batch']}: step-time overhead {constrained['step_s'] / free['step_s'] - 1:+.1%}")
    for name, seconds in ttft.items():
        print(f"time to first token, {name}: {seconds * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"decode": rows, "ttft_s": ttft}, f, indent=2)


if __name__ == "__main__":
    main()
