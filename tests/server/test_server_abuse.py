"""A server that survives abuse: oversized bodies, clients that never read, a storm of disconnects."""

import asyncio
import json
import random
import socket
import time

import httpx
import pytest

from lmgen import LLM, SamplingParams
from serverutil import long_llama_path, serve  # noqa: F401 (fixture)

MAX_REQUEST_BYTES = 65536
NUM_STORM_CLIENTS = 64


@pytest.fixture(scope="module")
def server(long_llama_path):
    with serve(long_llama_path, "--served-model-name", "tiny", "--max-request-bytes", str(MAX_REQUEST_BYTES)) as process:
        yield process


def wait_until_idle(server) -> None:
    for gauge in ("lmgen_requests_running", "lmgen_requests_waiting", "lmgen_kv_cache_usage_ratio"):
        assert server.wait_for_metric(gauge, lambda v: v == 0) == 0, gauge


def test_an_oversized_body_is_a_413_before_it_is_parsed(server):
    # Not even JSON: the size alone decides, before any parsing.
    oversized = b"{" * (MAX_REQUEST_BYTES + 1)
    declared = server.post("/v1/chat/completions", content=oversized, headers={"Content-Type": "application/json"})
    chunked = server.post("/v1/completions", content=iter([oversized[:40000], oversized[40000:]]),
                          headers={"Content-Type": "application/json"})  # no Content-Length: counted as read
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and str(MAX_REQUEST_BYTES) in error["message"]
    fits = {"model": "tiny", "prompt": "x" * (MAX_REQUEST_BYTES // 2)}
    assert server.post("/tokenize", json=fits).status_code == 200


def test_a_client_that_never_reads_its_stream_is_aborted(server):
    wait_until_idle(server)
    aborted = server.metric("lmgen_requests_total", status="abort")
    generated = server.metric("lmgen_generation_tokens_total")
    max_tokens, n = 2000, 64  # 64 sequences fill the buffers quickly
    body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True, "n": n}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: lmgen\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # Never read: once the socket buffers are full and its unread output passes the backlog,
        # the request is aborted, long before its tokens are all made, and its KV blocks are freed
        # while the connection is still open.
        assert server.wait_for_metric("lmgen_requests_total", lambda v: v == aborted + 1, status="abort") == aborted + 1
        wait_until_idle(server)
        assert server.metric("lmgen_generation_tokens_total") - generated < n * max_tokens / 8
    assert server.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}).status_code == 200


async def storm_client(client: httpx.AsyncClient, index: int, max_tokens: int, leave_after: int | None) -> str | None:
    """Stream one completion; return its text, or None after leaving once `leave_after` events arrived."""
    body = {"model": "tiny", "prompt": f"Request {index} says", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    text, num_events = "", 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            num_events += 1
            if num_events == leave_after:
                return None  # leaving the block closes the connection mid-stream
            if line != "data: [DONE]":
                chunk = json.loads(line.removeprefix("data: "))
                assert chunk["choices"][0]["finish_reason"] in (None, "length")
                text += chunk["choices"][0]["text"]
    return text


def test_64_streams_half_disconnecting_leave_the_others_whole_and_the_server_idle(server, long_llama_path):
    rng = random.Random(0)
    lengths = [rng.randint(4, 24) for _ in range(NUM_STORM_CLIENTS)]
    leave_after = [rng.randint(1, n) if i % 2 else None for i, n in enumerate(lengths)]
    wait_until_idle(server)
    before = server.metrics()

    async def storm() -> list[str | None]:
        limits = httpx.Limits(max_connections=NUM_STORM_CLIENTS)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(storm_client(client, i, n, leave_after[i])
                                          for i, n in enumerate(lengths)))

    texts = asyncio.run(storm())
    wait_until_idle(server)
    after = server.metrics()
    finished = sum(after.get(("lmgen_requests_total", (("status", status),)), 0)
                   - before.get(("lmgen_requests_total", (("status", status),)), 0) for status in ("abort", "length"))
    assert finished == NUM_STORM_CLIENTS  # every request ended: none left running or queued
    llm = LLM(str(long_llama_path))
    stayed = [i for i in range(NUM_STORM_CLIENTS) if leave_after[i] is None]
    expected = llm.generate([f"Request {i} says" for i in stayed],
                            [SamplingParams(max_tokens=lengths[i], ignore_eos=True, temperature=0) for i in stayed])
    assert [texts[i] for i in stayed] == [output.outputs[0].text for output in expected]
    assert all(texts[i] is None for i in range(NUM_STORM_CLIENTS) if leave_after[i] is not None)
