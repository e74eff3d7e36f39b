"""`lmgen serve` as a user types it: its flags and its failures."""

import re
import subprocess
import sys

import pytest

from lmgen.cli import main
from serverutil import free_port

SAMPLING_FLAGS = {"--max-tokens", "--min-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--seed",
                  "--stop", "--ignore-eos", "--json-schema", "--json-object", "--regex", "--choice", "--grammar"}


def help_flags(capsys, command: str) -> tuple[set[str], str]:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    return set(re.findall(r"--[a-z][a-z-]+", text)), text


def test_serve_help_documents_every_flag_and_the_engine_flags_of_llm(capsys):
    serve_flags, text = help_flags(capsys, "serve")
    assert {"--host", "--port", "--served-model-name", "--api-key", "--max-queued-requests",
            "--shutdown-timeout", "--tool-call-parser", "--reasoning-parser",
            "--max-request-bytes"} <= serve_flags
    generate_flags, _ = help_flags(capsys, "generate")
    assert generate_flags - SAMPLING_FLAGS <= serve_flags  # the engine flags of `generate`, i.e. of LLM(...)
    assert "127.0.0.1" in text and "8000" in text and "LMGEN_API_KEY" in text


def test_bad_flags_fail_before_listening(capsys):
    assert main(["serve", "--max-queued-requests", "-1"]) == 2
    assert "max-queued-requests" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--tool-call-parser", "qwen"])
    assert exited.value.code == 2
    assert "hermes" in capsys.readouterr().err  # the choices are listed
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--reasoning-parser", "r1"])
    assert exited.value.code == 2
    assert "'deepseek_r1', 'qwen3', 'none'" in capsys.readouterr().err
    assert main(["serve", "--max-request-bytes", "lots"]) == 2
    assert "'lots'" in capsys.readouterr().err
    assert main(["serve", "--max-request-bytes", "0"]) == 2
    assert "max-request-bytes" in capsys.readouterr().err


def test_a_model_that_cannot_load_is_one_error_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "lmgen", "serve", "--model", "./missing-model", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "lmgen: error:" in result.stderr and "missing-model" in result.stderr
    assert "Traceback" not in result.stderr
