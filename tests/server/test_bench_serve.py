"""`lmgen bench serve` against a real `lmgen serve` process."""

import json
import subprocess
import sys

from serverutil import serve


def test_bench_serve_reports_each_concurrency_level(llama_path, tmp_path):
    out = tmp_path / "serve.json"
    with serve(llama_path, "--served-model-name", "tiny") as server:
        result = subprocess.run([sys.executable, "-m", "lmgen", "bench", "serve", "--url", server.url, "--sizes", "1",
                                 "3", "--prompt-len", "12", "--new-tokens", "5", "--repeats", "2", "--json", str(out)],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["clients"], r["requests"]) for r in rows] == [(1, 2), (3, 6)]
    assert all(r["total_tok_s"] > 0 and r["ttft_s"] > 0 and r["itl_s"] > 0 for r in rows)
    assert "serve clients=3" in result.stdout


def test_bench_serve_without_a_url_says_how(capsys):
    from lmgen.cli import main

    assert main(["bench", "serve"]) == 2
    assert "--url" in capsys.readouterr().err
