"""The cost of structured output: decode-step time constrained vs free, and time to first token with a new schema.

    python benchmarks/structured.py                          # bench-125m, bfloat16, batch 1 and 16
    python benchmarks/structured.py --model PATH --dtype float32 --sizes 1 4

Free and constrained runs generate the same number of tokens per request, alternating
so that drift in the machine's speed hits both alike; the constrained one masks every
row with a JSON schema of realistic shape (records with strings, enums, numbers and
arrays). Tokens the grammar forces are appended without a model step of their own, so
a constrained step may compute several tokens and ms/step alone overstates the cost:
the grammar work (mask wait and apply, matcher advance) is timed directly and reported
as a share of a free decode step. Prints a table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lmgen.engine.runner as runner_module
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


class StepClock:
    """Counts model steps and times the grammar work the engine does on its own thread.

    Grammar work is the mask wait and apply in the runner and the matcher advance
    (with forced tokens) in the engine. Mask filling runs on a worker thread while the
    model runs; it is timed too, as the bound on what it could add if it did not overlap.
    """

    def __init__(self, llm: LLM) -> None:
        self.llm, self.steps, self.grammar_s, self.fill_s = llm, 0, 0.0, 0.0

    def _timed(self, function, field: str):
        def wrapper(*args):
            started = time.perf_counter()
            try:
                return function(*args)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - started)
        return wrapper

    def __enter__(self) -> "StepClock":
        engine = self.llm.engine
        execute = engine.runner.execute

        def counted(*args):
            self.steps += 1
            return execute(*args)

        self._restore = [(engine.runner, "execute", execute),
                         (runner_module, "apply_bitmask", runner_module.apply_bitmask),
                         (engine, "_advance_grammar", engine._advance_grammar),
                         (engine.grammar_backend, "fill_bitmask", engine.grammar_backend.fill_bitmask)]
        engine.runner.execute = counted
        runner_module.apply_bitmask = self._timed(runner_module.apply_bitmask, "grammar_s")
        engine._advance_grammar = self._timed(engine._advance_grammar, "grammar_s")
        engine.grammar_backend.fill_bitmask = self._timed(engine.grammar_backend.fill_bitmask, "fill_s")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._restore:
            setattr(owner, name, original)


def decode(llm: LLM, batch: int, new_tokens: int, structured: dict | None) -> dict:
    """Step time, grammar time per step and tokens/s for `batch` requests of `new_tokens` tokens each."""
    params = [SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=row, structured=structured)
              for row in range(batch)]
    with StepClock(llm) as clock:
        started = time.perf_counter()
        outputs = llm.generate([PROMPT] * batch, params)
        elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"step_s": elapsed / clock.steps, "grammar_step_s": clock.grammar_s / clock.steps,
            "fill_step_s": clock.fill_s / clock.steps, "tokens_per_s": tokens / elapsed, "steps": clock.steps,
            "tokens": tokens}


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
        modes = {"free": None, "json_schema": spec}
        runs = {name: [] for name in modes}
        for _ in range(args.repeats):  # alternating, so that drift in the machine's speed hits both alike
            for name, structured in modes.items():
                runs[name].append(decode(llm, batch, args.new_tokens, structured))
        for name, mode_runs in runs.items():
            rows.append({"batch": batch, "mode": name,
                         **{k: statistics.median(r[k] for r in mode_runs) for k in mode_runs[0]}})
    print(f"{'batch':>5} {'mode':>12} {'ms/step':>8} {'grammar ms/step':>16} {'mask fill ms/step':>18} "
          f"{'tok/s':>7} {'steps':>6} {'tokens':>7}")
    for row in rows:
        print(f"{row['batch']:>5} {row['mode']:>12} {row['step_s'] * 1e3:>8.1f} {row['grammar_step_s'] * 1e3:>16.2f} "
              f"{row['fill_step_s'] * 1e3:>18.2f} {row['tokens_per_s']:>7.1f} {row['steps']:>6.0f} "
              f"{row['tokens']:>7.0f}")
    for free, constrained in zip(rows[::2], rows[1::2]):
        grammar, fill = constrained["grammar_step_s"], constrained["fill_step_s"]
        speedup = constrained["tokens_per_s"] / free["tokens_per_s"]
        print(f"batch {free['batch']}: grammar work {grammar / free['step_s']:.1%} of a free decode step "
              f"({(grammar + fill) / free['step_s']:.1%} if mask filling did not overlap the model); "
              f"tokens/s {speedup:.2f}x free (forced tokens need no step)")
    for name, seconds in ttft.items():
        print(f"time to first token, {name}: {seconds * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"decode": rows, "ttft_s": ttft}, f, indent=2)


if __name__ == "__main__":
    main()
