"""`lmgen bench serve`: N concurrent streaming clients against a running OpenAI-compatible server.

Each client sends its requests one after another: a prompt of exactly ``prompt_len``
token ids (lmgen.bench.PROMPTS: new to the server at every concurrency level, so no
prefix-cache hit makes a prefill free, and below the largest id its /tokenize gives plain
text) and exactly ``new_tokens`` generated tokens (EOS ignored, greedy). Reported per
concurrency level, as the clients see it: requests/s, output tokens/s, time to first
token and inter-token latency (median and p90). benchmarks/serve_load.py runs the same
clients beside transformers' static batches. Errors talking to the server (nothing
listening, 401 without the key, 4xx/5xx) are LmgenErrors: one line from the CLI.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass, field

from lmgen.bench import PROMPTS
from lmgen.errors import InvalidArgumentError, LmgenError

#: text whose largest token id bounds the synthetic prompts' ids to ones the server's tokenizer produces
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog; Lisbon, 1234567890."


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


def _client(limit: int, api_key: str | None):
    import httpx

    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=limit),
                             headers={"Authorization": f"Bearer {api_key}"} if api_key else None)


async def stream_one(client, url: str, prompt: list[int], new_tokens: int) -> RequestTiming:
    """One streaming completion, timing every token chunk; checks the server generated all of them."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    timing = RequestTiming(time.perf_counter())
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.is_error:
            await response.aread()  # the server's error message, for describe_error
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any(choice["text"] or not choice.get("finish_reason") for choice in chunk["choices"]):
                timing.token_times.append(time.perf_counter())
    # lmgen sends a chunk per token; llama-server holds back a token that ends inside a UTF-8 character
    # and sends it with the next one, so there a chunk may carry several, and it ends with a chunk of no
    # text that only carries the finish reason (not a token)
    if usage is None or usage["completion_tokens"] != new_tokens or not 0 < len(timing.token_times) <= new_tokens:
        raise LmgenError(f"{url} did not generate {new_tokens} tokens as asked (ignore_eos): got "
                         f"{len(timing.token_times)} chunks and usage {usage}")
    return timing


async def run_clients(url: str, prompts: list[list[list[int]]], new_tokens: int,
                      api_key: str | None = None) -> tuple[list[RequestTiming], float]:
    """Each client (all but the last list of `prompts`, which warms up) sends its prompts one after another."""
    *per_client, [warm_up] = prompts
    async with _client(len(per_client) + 1, api_key) as client:
        await stream_one(client, url, warm_up, 2)

        async def client_loop(own: list[list[int]]) -> list[RequestTiming]:
            return [await stream_one(client, url, prompt, new_tokens) for prompt in own]

        start = time.perf_counter()
        timings = await asyncio.gather(*(client_loop(own) for own in per_client))
        return [t for client_timings in timings for t in client_timings], time.perf_counter() - start


def workload(clients: int, per_client: int, prompt_len: int, vocab_size: int) -> list[list[list[int]]]:
    """Each client's prompts, then a list holding the warm-up prompt: all new ones from PROMPTS."""
    prompts = PROMPTS.take(clients * per_client + 1, prompt_len, vocab_size)
    return [prompts[c * per_client:(c + 1) * per_client] for c in range(clients)] + [prompts[-1:]]


async def token_id_bound(url: str, api_key: str | None) -> int:
    """One past the largest token id the server's tokenizer gives SAMPLE_TEXT: ids below it are the model's."""
    async with _client(1, api_key) as client:
        response = await client.post(url + "/tokenize", json={"prompt": SAMPLE_TEXT})
        response.raise_for_status()
        return max(response.json()["tokens"]) + 1


async def _serve_rows(url: str, sizes: list[int], prompt_len: int, new_tokens: int, per_client: int,
                      api_key: str | None) -> list[dict]:
    vocab_size = await token_id_bound(url, api_key)
    PROMPTS.jump()  # the server may have served an earlier run; its cache would make those prompts free
    rows = []
    for clients in sizes:
        prompts = workload(clients, per_client, prompt_len, vocab_size)
        timings, seconds = await run_clients(url, prompts, new_tokens, api_key)
        rows.append(summary("server", clients, timings, new_tokens, seconds))
    return rows


def serve_rows(url: str | None, sizes: list[int], prompt_len: int, new_tokens: int, per_client: int,
               api_key: str | None = None) -> list[dict]:
    """One row per concurrency level in `sizes`; `api_key` (default $LMGEN_API_KEY) goes in each request."""
    if not url:
        raise InvalidArgumentError("bench serve needs --url, the server to load (start one with `lmgen serve`)")
    if not url.startswith(("http://", "https://")):
        raise InvalidArgumentError(f"--url must start with http:// or https://, got {url!r}")
    if importlib.util.find_spec("httpx") is None:
        raise LmgenError('bench serve needs httpx, which is not installed: install it with pip install -e ".[bench]"')
    import httpx

    url = url.rstrip("/")
    try:
        return asyncio.run(_serve_rows(url, sizes, prompt_len, new_tokens, per_client,
                                       api_key or os.environ.get("LMGEN_API_KEY")))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise LmgenError(" ".join(describe_error(url, exc).split())) from None  # one line, whatever the server sent
    except LmgenError:
        raise
    except (ValueError, KeyError) as exc:  # a reply that is not the OpenAI API's
        raise LmgenError(f"{url} does not answer like an OpenAI-compatible server: {type(exc).__name__}: {exc}") \
            from None


def describe_error(url: str, exc: Exception) -> str:
    """One line saying what went wrong talking to the server and what to do."""
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url} ({exc}): is a server running there (lmgen serve)?"
    if not isinstance(exc, httpx.HTTPStatusError):
        return f"talking to {url}: {type(exc).__name__}: {exc}"
    response = exc.response
    if response.status_code == 401:
        return (f"{url} wants an API key (401 Unauthorized): pass --api-key (or set LMGEN_API_KEY) with the key "
                "it was started with")
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200]
    return f"{exc.request.url} answered {response.status_code} {response.reason_phrase}: {message}"
