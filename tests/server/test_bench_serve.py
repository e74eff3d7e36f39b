"""`lmgen bench serve` against a real `lmgen serve` process."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from lmgen.bench_serve import stream_one
from serverutil import free_port, serve


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


@pytest.fixture(scope="module")
def keyed_server(llama_path):
    """A server that wants an API key and caches 4-token blocks (so 12-token prompts have full blocks to share)."""
    with serve(llama_path, "--api-key", "secret", "--block-size", "4", api_key="secret") as server:
        yield server


def one_line_error(capsys, *args: str) -> str:
    from lmgen.cli import main

    assert main(["bench", "serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmgen: error: ") and err.count("\n") == 1, err
    return err


def test_bench_serve_without_a_server_is_one_line(capsys):
    err = one_line_error(capsys, "--url", f"http://127.0.0.1:{free_port()}", "--sizes", "1")
    assert "cannot connect" in err
    assert "--url must start with http://" in one_line_error(capsys, "--url", "127.0.0.1:8000")


def test_bench_serve_errors_from_the_server_are_one_line(keyed_server, capsys, monkeypatch):
    monkeypatch.delenv("LMGEN_API_KEY", raising=False)
    assert "LMGEN_API_KEY" in one_line_error(capsys, "--url", keyed_server.url, "--sizes", "1")
    monkeypatch.setenv("LMGEN_API_KEY", "wrong")
    assert "401" in one_line_error(capsys, "--url", keyed_server.url, "--sizes", "1")
    monkeypatch.setenv("LMGEN_API_KEY", "secret")  # past the key: a prompt longer than the model's context
    assert "answered 400" in one_line_error(capsys, "--url", keyed_server.url, "--sizes", "1", "--prompt-len", "300")
    monkeypatch.delenv("LMGEN_API_KEY")  # the flag alone gets past the key too
    assert "answered 400" in one_line_error(capsys, "--url", keyed_server.url, "--api-key", "secret", "--sizes", "1",
                                            "--prompt-len", "300")


def test_bench_serve_sends_no_prompt_twice_across_levels_and_runs(keyed_server, monkeypatch):
    from lmgen import bench_serve

    sent = []
    stream_one = bench_serve.stream_one

    async def recording(client, url, prompt, new_tokens):
        sent.append(prompt)
        return await stream_one(client, url, prompt, new_tokens)

    monkeypatch.setattr(bench_serve, "stream_one", recording)
    for _ in range(2):  # two runs against one long-lived server, as a user would
        rows = bench_serve.serve_rows(keyed_server.url, [1, 2, 3], prompt_len=12, new_tokens=2, per_client=2,
                                      api_key="secret")
        assert [r["requests"] for r in rows] == [2, 4, 6]
    assert len(sent) == 2 * (12 + 3)  # timed requests and a warm-up per level
    assert all(len(prompt) == 12 and max(prompt) < 512 for prompt in sent)
    assert len({tuple(prompt[:4]) for prompt in sent}) == len(sent)  # no first KV block shared: no cache hit


def test_stream_one_counts_tokens_not_a_closing_chunk_without_text():
    """llama-server ends a stream with a chunk that only carries the finish reason: no token."""
    chunks = [{"choices": [{"index": 0, "text": text, "finish_reason": None}]} for text in ("a", "b")]
    chunks += [{"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
               {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 3}}]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"

    async def stream():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await stream_one(client, "http://server", [1, 2, 3], 2)

    assert len(asyncio.run(stream()).token_times) == 2
