"""Soak: `lmgen serve` under steady load for minutes — errors, latency and the server's memory over time.

    python benchmarks/soak.py                           # the demo model, 10 minutes, 16 clients
    python benchmarks/soak.py --minutes 1               # a quick check that it runs
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234   # a server already running

Each client sends requests one after another until the time is up, cycling through the
three generating routes: a streamed chat completion (with its usage chunk), a completion
answered whole, and a streamed /v1/responses; each with a prompt of its own and 16-64
new tokens (EOS ignored). A request counts as an error unless it answers 200 and ends as
its route ends (the [DONE] after a finish_reason, the whole JSON, response.completed or
response.incomplete) with exactly the tokens asked for. Every --report-every seconds a
row shows the requests finished in that window, their errors, p50/p99 latency (request
sent to last byte) and the server's resident memory (VmRSS); the summary compares the
memory after the warm-up (the first fifth of the run) with the memory at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lmgen.bench_serve import percentile
from serve_load import lmgen_server

DEMO_MODEL = Path(__file__).resolve().parent.parent / "lmgen" / "demo_model"
TOPICS = ["the sea", "a city at night", "bread", "winter", "a lighthouse", "trains", "the moon", "a garden"]


@dataclass
class Window:
    """What happened between two reports."""

    elapsed_s: float
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    rss_mib: float | None = None

    def row(self) -> dict:
        p50, p99 = (round(percentile(self.latencies, q), 3) if self.latencies else None for q in (0.5, 0.99))
        return {"elapsed_s": round(self.elapsed_s), "requests": self.requests, "errors": self.errors,
                "p50_s": p50, "p99_s": p99, "rss_mib": self.rss_mib}


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


async def sse_events(response: httpx.Response) -> list[dict | str]:
    """Every `data:` payload of a stream, parsed ([DONE] kept as the string)."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            async for line in response.aiter_lines() if line.startswith("data: ")]


async def chat_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return False
        events = await sse_events(response)
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    usage = events[-2]["usage"]
    return events[-1] == "[DONE]" and finishes[-1] == "length" and usage["completion_tokens"] == max_tokens


async def completion(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> bool:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    response = await client.post("/v1/completions", json=body)
    return response.status_code == 200 and response.json()["usage"]["completion_tokens"] == max_tokens


async def responses_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> bool:
    body = {"model": model, "input": prompt, "max_output_tokens": max_tokens, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/responses", json=body) as response:
        if response.status_code != 200:
            return False
        events = await sse_events(response)
    last = events[-1]
    return last["type"] in ("response.completed", "response.incomplete") and \
        last["response"]["usage"]["output_tokens"] == max_tokens


ROUTES = (chat_stream, completion, responses_stream)


async def client_loop(index: int, client: httpx.AsyncClient, model: str, deadline: float,
                      record: Callable[[bool, float], None]) -> None:
    rng = random.Random(index)
    for number in itertools.count():
        if time.monotonic() >= deadline:
            return
        route = ROUTES[(index + number) % len(ROUTES)]
        prompt = f"Client {index}, request {number}: write about {rng.choice(TOPICS)}."
        start = time.perf_counter()
        try:
            ok = await route(client, model, prompt, rng.randint(16, 64))
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            ok = False
        record(ok, time.perf_counter() - start)


async def soak(url: str, model: str, clients: int, seconds: float, report_every: float, pid: int | None,
               api_key: str | None) -> list[Window]:
    start = time.monotonic()
    windows = [Window(0.0)]

    def record(ok: bool, latency: float) -> None:
        window = windows[-1]
        window.requests += 1
        window.errors += not ok
        window.latencies.append(latency)

    async def reporter() -> None:
        while True:
            await asyncio.sleep(report_every)
            window = windows[-1]
            window.elapsed_s, window.rss_mib = time.monotonic() - start, rss_mib(pid)
            print_row(window.row())
            windows.append(Window(0.0))

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as client:
        report = asyncio.create_task(reporter())
        await asyncio.gather(*(client_loop(i, client, model, start + seconds, record) for i in range(clients)))
        report.cancel()
    last = windows[-1]
    last.elapsed_s, last.rss_mib = time.monotonic() - start, rss_mib(pid)
    print_row(last.row())
    return windows


def print_row(row: dict) -> None:
    p50, p99, rss = ("-" if row[key] is None else f"{row[key]:.3f}" for key in ("p50_s", "p99_s", "rss_mib"))
    print(f"{row['elapsed_s']:>8} {row['requests']:>9} {row['errors']:>7} {p50:>8} {p99:>8} {rss:>9}", flush=True)


def summarize(windows: list[Window], seconds: float) -> dict:
    latencies = [t for w in windows for t in w.latencies]
    warm = [w for w in windows if w.elapsed_s >= seconds / 5] or windows
    return {"requests": sum(w.requests for w in windows), "errors": sum(w.errors for w in windows),
            "p50_s": round(percentile(latencies, 0.5), 3), "p99_s": round(percentile(latencies, 0.99), 3),
            "rss_after_warmup_mib": warm[0].rss_mib, "rss_end_mib": windows[-1].rss_mib,
            "windows": [w.row() for w in windows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--report-every", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--url", default=None, help="a server already running (default: start `lmgen serve`)")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process, for its memory")
    parser.add_argument("--model", default=str(DEMO_MODEL), help="the checkpoint to serve (default: the demo model)")
    parser.add_argument("--served-model", default=None, help="with --url: the model name to ask for")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    seconds = args.minutes * 60
    print(f"{args.clients} clients for {args.minutes:g} min; a row every {args.report_every:g} s", flush=True)
    print(f"{'elapsed':>8} {'requests':>9} {'errors':>7} {'p50_s':>8} {'p99_s':>8} {'rss_mib':>9}")
    if args.url:
        windows = asyncio.run(soak(args.url, args.served_model, args.clients, seconds, args.report_every, args.pid,
                                   args.api_key))
    else:
        path = Path(args.model)
        with lmgen_server(path, "float32", args.clients, 2048, "512MiB") as (url, pid):
            windows = asyncio.run(soak(url, str(path), args.clients, seconds, args.report_every, pid, None))
    result = summarize(windows, seconds)
    print(f"total: {result['requests']} requests, {result['errors']} errors, p50 {result['p50_s']} s, "
          f"p99 {result['p99_s']} s; server RSS {result['rss_after_warmup_mib']} MiB after warm-up, "
          f"{result['rss_end_mib']} MiB at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
