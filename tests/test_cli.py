"""The lmgen command as a user types it."""

import io
import re
import subprocess
import sys

import pytest

from lmgen import cli
from lmgen.cli import main


def lmgen(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmgen", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_the_commands():
    result = lmgen("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout and "chat" in result.stdout


def test_generate_help_explains_the_flags():
    result = lmgen("generate", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--dtype", "--kv-cache-memory", "--max-tokens", "--temperature", "--seed", "--stop"):
        assert flag in result.stdout


def test_generate_streams_the_continuation(llama_path):
    result = lmgen("generate", "Portugal is", "--model", str(llama_path), "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Portugal is") and len(result.stdout) > len("Portugal is")


def test_generate_with_speculation_gives_the_tokens_without(llama_path, llama_draft_path):
    args = ("generate", "Portugal is Portugal is Portugal", "--model", str(llama_path), "-n", "12", "-t", "0")
    plain = lmgen(*args)
    for flags in (("--speculative-ngram", "3"),
                  ("--speculative-model", str(llama_draft_path), "--num-speculative-tokens", "3")):
        fast = lmgen(*args, *flags)
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout == plain.stdout


def test_generate_reads_the_prompt_from_stdin(llama_path):
    result = lmgen("generate", "--model", str(llama_path), "-n", "4", "-t", "0", stdin="Lisbon")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_chat_keeps_history_and_resets(llama_path):
    result = lmgen("chat", "--model", str(llama_path), "-n", "3", "-t", "0", stdin="hello\n/reset\nagain\n")
    assert result.returncode == 0, result.stderr
    assert "(history cleared)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("generate", "hi", "--model", "./missing-model"), "no checkpoint folder"),
    (("generate", "hi", "--max-tokens", "0"), "max_tokens must be at least 1"),
    (("generate", "hi", "--temperature", "-1"), "temperature must be >= 0"),
    (("generate", "", "--max-tokens", "2"), "prompt is empty"),
    (("generate", "x", "--regex", "("), 'invalid regex "\\(".*regex parse error: unclosed group'),
    (("generate", "x", "--log-level", "loud"), "argument --log-level: invalid choice: 'LOUD'"),
    (("perplexity", "--file", "x.txt", "--stride", "0"), "argument --stride: must be at least 1, got 0"),
    (("generate", "x", "--speculative-ngram", "0"), "num_speculative_tokens must be a positive integer"),
    (("generate", "x", "--num-speculative-tokens", "3"), "--num-speculative-tokens needs --speculative-model"),
    (("generate", "x", "--speculative-model", "./missing-draft"),
     r"the draft model \(speculative_config 'model'\): no checkpoint folder at './missing-draft'"),
    (("generate", "x", "--speculative-model", "d", "--speculative-ngram", "2"),
     "argument --speculative-ngram: not allowed with argument --speculative-model"),
    (("generate", "x", "--tensor-parallel-size", "0"), "argument --tensor-parallel-size/-tp: must be at least 1, got 0"),
    (("serve", "--replicas", "0"), "argument --replicas: must be at least 1, got 0"),
    (("generate", "x", "--map-weights", "-tp", "2"), r"map_weights=True does not apply with tensor_parallel_size > 1"),
    (("generate", "x", "--max-num-partial-prefills", "0"), "max_num_partial_prefills must be a positive integer"),
    (("generate", "x", "--kv-cache-dtype", "fp8"), "lmgen does not store fp8 keys and values yet"),
])
def test_errors_are_one_line_without_traceback(llama_path, args, message):
    if "--model" not in args:
        args = args + ("--model", str(llama_path))
    result = lmgen(*args)
    assert result.returncode == 2
    assert re.search(message, result.stderr) and result.stderr.startswith("lmgen: error: ")
    assert result.stdout == ""  # the prompt is not echoed before a refusal
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_compares_with_transformers_and_writes_json(llama_path, tmp_path):
    import json

    out, image = tmp_path / "bench.json", tmp_path / "bench.png"
    result = lmgen("bench", "throughput", "--model", str(llama_path), "--sizes", "2", "--prompt-len", "8",
                   "--new-tokens", "4", "--repeats", "1", "--compare", "transformers", "--json", str(out),
                   "--plot", str(image))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["system"] for r in rows] == ["lmgen", "transformers"]
    assert all(r["total_tok_s"] > 0 for r in rows) and rows[1]["ratio"] == 1.0
    assert image.read_bytes().startswith(b"\x89PNG")


def test_bench_speculative_runs_both_tasks_beside_transformers_prompt_lookup(tmp_path):
    import json

    out = tmp_path / "speculative.json"
    result = lmgen("bench", "speculative", "--sizes", "1", "--new-tokens", "32", "--compare", "transformers",
                   "--json", str(out))  # the demo model: its 512-token context gets the edit task's short form
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    systems = ["lmgen", "lmgen ngram", "transformers prompt lookup"]
    assert [(r["workload"], r["system"]) for r in rows] == [(w, s) for w in ("edit n=1", "free n=1") for s in systems]
    for plain, drafting, peer in zip(rows[::3], rows[1::3], rows[2::3]):
        assert plain["ratio"] == 1.0 and plain["acceptance"] is None
        assert drafting["tokens"] == plain["tokens"] == peer["tokens"]  # greedy: the same output, faster or not
        assert drafting["decode_tok_s"] > 0 and peer["decode_tok_s"] > 0
    # drafts were made and counted (how many the demo model accepts depends on what lmgen's source says today)
    assert 0 <= rows[1]["acceptance"] <= 1 and rows[1]["accepted_length"] >= 1


def test_bench_plot_without_matplotlib_fails_before_loading(monkeypatch, capsys):
    from lmgen.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises
    assert main(["bench", "latency", "--model", "./missing-model", "--plot", "out.png"]) == 2
    error = capsys.readouterr().err
    assert "pip install 'lmgen[plot]'" in error and "missing-model" not in error


def test_bench_prefix_reports_cache_on_and_off(llama_path):
    result = lmgen("bench", "prefix", "--model", str(llama_path), "--prompt-len", "40", "--repeats", "1",
                   "--kv-cache-dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert "prefix cache on" in result.stdout and "prefix cache off" in result.stdout
    assert "torch.float32, KV cache 16384 tokens in torch.float16" in result.stdout  # 64 sequences of 256


def test_bench_latency_times_prefill_of_prompts_the_cache_has_not_seen(llama_path):
    from lmgen import LLM
    from lmgen.bench import run_bench

    llm = LLM(str(llama_path), block_size=4)
    rows = run_bench(llm, "latency", [2], prompt_len=16, new_tokens=2, repeats=2, compare=None)
    assert rows[0]["prefill_tok_s"] > 0
    assert llm.engine.scheduler.num_prefix_hit_tokens == 0  # a hit would time no prefill at all


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin, notice", [(Terminal("Lisbon"), True), (io.StringIO("Lisbon"), False)])
def test_generate_says_it_reads_stdin_only_on_a_terminal(llama_path, monkeypatch, capsys, stdin, notice):
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["generate", "--model", str(llama_path), "-n", "2", "-t", "0"]) == 0
    assert ("reading the prompt from standard input" in capsys.readouterr().err) == notice


def test_a_piped_prompt_loses_the_newline_echo_adds(llama_path, monkeypatch, capsys):
    args = ["--model", str(llama_path), "-n", "6", "-t", "0", "--ignore-eos"]
    assert main(["generate", "Lisbon", *args]) == 0
    from_argument = capsys.readouterr().out.removeprefix("Lisbon")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Lisbon\n"))
    assert main(["generate", *args]) == 0
    assert capsys.readouterr().out == from_argument


def test_global_flags_go_before_or_after_the_command(monkeypatch):
    levels = []
    monkeypatch.setattr(cli, "run_generate", lambda args: levels.append(args.log_level) or 0)
    for argv in (["generate", "x", "--log-level", "debug"], ["--log-level", "DEBUG", "generate", "x"],
                 ["--log-level", "error", "generate", "x", "--log-level", "info"], ["generate", "x"]):
        assert main(argv) == 0
    assert levels == ["DEBUG", "DEBUG", "INFO", "WARNING"]  # a command's own default never overrides


def test_chat_commands_never_reach_the_model(llama_path, monkeypatch, capsys):
    prompts = []

    def reply(llm, prompt, params, echo_prompt=False):
        prompts.append(llm.tokenizer.decode(prompt))
        return "ok"

    monkeypatch.setattr(cli, "_stream_to_stdout", reply)
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "hello\n/help\n/system Be terse.\n/nope x\nagain\n/reset\nthird\n/system\nfourth\n/exit\nnot read\n"))
    assert main(["chat", "--model", str(llama_path), "--system", "Be kind."]) == 0
    err = capsys.readouterr().err
    assert "/system TEXT" in err and "unknown command /nope: /help lists the commands" in err
    assert len(prompts) == 4
    assert "Be kind." in prompts[0] and "hello" in prompts[0]
    assert "Be terse." in prompts[1] and "hello" in prompts[1] and "/nope" not in prompts[1]  # /system keeps the turns
    assert "Be terse." in prompts[2] and "hello" not in prompts[2]  # /reset keeps the system prompt
    assert "system" not in prompts[3] and "third" in prompts[3]


@pytest.mark.parametrize("missing", ["fastapi", "prometheus_client"])
def test_serve_without_the_server_extra_fails_before_loading(monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it fails
    assert main(["serve", "--model", "./missing-model"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lmgen: error: lmgen serve needs the server extra") and missing in error
    assert 'pip install -e ".[server]"' in error and "missing-model" not in error
    assert len(error.strip().splitlines()) == 1
