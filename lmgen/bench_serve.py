"""`lmgen bench serve`: N concurrent streaming clients against a running OpenAI-compatible server.

Each client sends its requests one after another: a prompt of exactly ``prompt_len``
tokens (made with the server's own /tokenize, distinct per request, so no prefix is
shared) and exactly ``new_tokens`` generated tokens (EOS ignored, greedy). Reported per
concurrency level, as the clients see it: requests/s, output tokens/s, time to first
token and inter-token latency (median and p90). benchmarks/serve_load.py runs the same
clients beside transformers' static batches.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass, field

from lmgen.errors import InvalidArgumentError


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(system: str, clients: int, timings: list[RequestTiming], new_tokens: int, seconds: float) -> dict:
    """One row of `lmgen bench`'s report: latencies in seconds, throughput in output tokens/s."""
    ttfts = [t.ttft for t in timings]
    gaps = [g for t in timings for g in t.gaps]
    # latencies to the microsecond: tokens that arrive in one network read are microseconds apart
    return {"workload": f"serve clients={clients}", "system": system, "clients": clients, "requests": len(timings),
            "req_per_s": round(len(timings) / seconds, 3), "total_tok_s": round(len(timings) * new_tokens / seconds, 2),
            "ttft_s": round(statistics.median(ttfts), 6), "ttft_p90_s": round(percentile(ttfts, 0.9), 6),
            "itl_s": round(statistics.median(gaps), 6) if gaps else None,
            "itl_p90_s": round(percentile(gaps, 0.9), 6) if gaps else None}


def _client(limit: int):
    import httpx

    key = os.environ.get("LMGEN_API_KEY")
    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=limit),
                             headers={"Authorization": f"Bearer {key}"} if key else None)


async def stream_one(client, url: str, prompt: list[int], new_tokens: int) -> RequestTiming:
    """One streaming completion, timing every token chunk; checks the server generated all of them."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    timing = RequestTiming(time.perf_counter())
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"]:  # the server sends one chunk per generated token
                timing.token_times.append(time.perf_counter())
    if usage is None or usage["completion_tokens"] != new_tokens or len(timing.token_times) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(timing.token_times)} chunks and usage {usage}")
    return timing


async def run_clients(url: str, prompts: list[list[list[int]]], new_tokens: int) -> tuple[list[RequestTiming], float]:
    """Each client (all but the last list of `prompts`, which warms up) sends its prompts one after another."""
    *per_client, [warm_up] = prompts
    async with _client(len(per_client) + 1) as client:
        await stream_one(client, url, warm_up, 2)

        async def client_loop(own: list[list[int]]) -> list[RequestTiming]:
            return [await stream_one(client, url, prompt, new_tokens) for prompt in own]

        start = time.perf_counter()
        timings = await asyncio.gather(*(client_loop(own) for own in per_client))
        return [t for client_timings in timings for t in client_timings], time.perf_counter() - start


async def server_prompts(url: str, clients: int, per_client: int, length: int) -> list[list[list[int]]]:
    """Distinct prompts of exactly `length` tokens from the server's tokenizer, per client, plus a warm-up."""
    filler = " ".join(["the quick brown fox jumps over the lazy dog"] * (length // 4 + 8))
    async with _client(4) as client:
        async def one(i: int) -> list[int]:
            response = await client.post(url + "/tokenize", json={"prompt": f"Request {i}: {filler}"})
            response.raise_for_status()
            tokens = response.json()["tokens"]
            if len(tokens) < length:
                raise RuntimeError(f"could not make a {length}-token prompt from the server's tokenizer")
            return tokens[:length]

        prompts = [await one(i) for i in range(clients * per_client + 1)]
    return [prompts[c * per_client:(c + 1) * per_client] for c in range(clients)] + [prompts[-1:]]


def serve_rows(url: str | None, sizes: list[int], prompt_len: int, new_tokens: int, per_client: int) -> list[dict]:
    """One row per concurrency level in `sizes`."""
    if not url:
        raise InvalidArgumentError("bench serve needs --url, the server to load (start one with `lmgen serve`)")
    if importlib.util.find_spec("httpx") is None:
        raise InvalidArgumentError("bench serve needs httpx: pip install 'lmgen[bench]'")
    url = url.rstrip("/")
    rows = []
    for clients in sizes:
        prompts = asyncio.run(server_prompts(url, clients, per_client, prompt_len))
        timings, seconds = asyncio.run(run_clients(url, prompts, new_tokens))
        rows.append(summary("server", clients, timings, new_tokens, seconds))
    return rows
