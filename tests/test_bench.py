"""`lmgen bench` in the library modes: every timed prompt is new to the engine (no prefix-cache
hit makes a prefill free), missing extras are one-line errors, the printed table aligns."""

from __future__ import annotations

import re
import sys

import pytest

from lmgen import LLM, bench
from lmgen.errors import LmgenError


@pytest.fixture
def engine_calls(monkeypatch) -> list[tuple[str, int, bool]]:
    """Every call the benchmarks make on an engine, as (which, prefix-cache hit tokens, caching on),
    the hits read from the engine's own scheduler."""
    calls = []

    def observe(function, name: str):
        def observed(llm: LLM, *args):
            scheduler = llm.engine.scheduler
            before = scheduler.num_prefix_hit_tokens
            result = function(llm, *args)
            calls.append((name, scheduler.num_prefix_hit_tokens - before, scheduler.config.enable_prefix_caching))
            return result

        return observed

    monkeypatch.setattr(bench, "lmgen_run", observe(bench.lmgen_run, "batch"))
    monkeypatch.setattr(bench, "first_token_seconds", observe(bench.first_token_seconds, "first token"))
    return calls


def test_latency_and_throughput_never_hit_the_prefix_cache(llama_path, engine_calls):
    llm = LLM(str(llama_path), block_size=4)  # 12-token prompts: 2 full blocks a hit could reuse
    for mode in ("latency", "throughput", "latency"):  # the same warm engine throughout, as a library user may
        rows = bench.run_bench(llm, mode, [1, 2, 4], prompt_len=12, new_tokens=2, repeats=3, compare=None)
        assert [row["workload"] for row in rows] == [f"{mode} n={n}" for n in (1, 2, 4)]
    assert len(engine_calls) == 3 * 3 * 4  # modes x sizes x (warm-up + 3 repeats)
    assert [hits for _, hits, _ in engine_calls] == [0] * len(engine_calls)
    assert all(caching for _, _, caching in engine_calls)


def test_prefix_mode_reuses_its_prefix_and_nothing_else(llama_path, engine_calls):
    llm = LLM(str(llama_path), block_size=4)
    rows = bench.run_bench(llm, "prefix", [1], prompt_len=10, new_tokens=2, repeats=2, compare=None)
    assert [row["system"] for row in rows] == ["lmgen prefix cache on", "lmgen prefix cache off"]
    cache_on = [hits for _, hits, caching in engine_calls if caching]
    # each run: an earlier request computes a new prefix cold, the timed one reuses its 2 full blocks
    assert cache_on == [0, 8] * 3
    cache_off = [call for call in engine_calls if not call[2]]
    assert len(cache_off) == 6  # the cold runs: an engine without prefix caching


def test_prompt_source_never_repeats_a_first_block():
    source = bench.PromptSource()
    prompts = source.take(600, 5, vocab_size=512) + source.take(600, 5, vocab_size=512)
    assert len({p[0] for p in prompts[:508]}) == 508  # fewer than base (512 - 4) apart: the first token differs
    assert len({tuple(p[:3]) for p in prompts}) == len(prompts)
    assert all(3 <= t < 511 for p in prompts for t in p)
    assert bench.PromptSource(10**9).take(3, 2, 32000)[0] != bench.PromptSource(0).take(1, 2, 32000)[0]


def test_compare_transformers_without_transformers_is_one_line_before_the_run(llama_path, monkeypatch, capsys):
    from lmgen.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails, find_spec says None
    with pytest.raises(LmgenError, match=re.escape('pip install -e ".[bench]"')):
        bench.run_bench(None, "latency", [1], 8, 2, 1, compare="transformers")  # no engine touched
    code = main(["bench", "latency", "--compare", "transformers", "--model", str(llama_path), "--new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmgen: error: --compare transformers needs transformers") and err.count("\n") == 1


def test_transformers_loads_quietly(llama_path, capfd):
    import torch
    from transformers.utils import logging as hf_logging

    bench.load_transformers(str(llama_path), torch.float32, torch.device("cpu"))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


def test_report_columns_align_for_any_width(capsys):
    rows = [{"workload": "throughput n=1", "system": "lmgen", "total_tok_s": 12.5, "ratio": 3.1},
            {"workload": "throughput n=16", "system": "transformers", "total_tok_s": 123456.0, "ratio": 1.0},
            {"workload": "throughput n=1024", "system": "lmgen", "ttft_s": 0.25}]
    bench.report(rows, None, "throughput")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4

    def column_ends(line: str) -> list[int]:  # cells hold single spaces; columns are two or more apart
        return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)]

    assert all(column_ends(line) == column_ends(lines[0]) for line in lines)
    assert "throughput n=1024" in lines[3]
