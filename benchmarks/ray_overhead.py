"""What Ray Serve costs: `lmgen serve` beside `lmgen serve --replicas N`, one after the other.

    python benchmarks/ray_overhead.py                   # the demo model, 2 replicas, 50 requests
    python benchmarks/ray_overhead.py --model PATH --replicas 4 --requests 200

For each server: seconds from the command's start to the first 200 from /health (Ray's
start, the replicas' model loads), then the median and p90 latency of requests sent one
after another (a chat completion of one token: the path through the server, not the
model's work), then seconds from SIGTERM to exit. Both run torch on one thread, as Ray
runs each replica reserving one CPU. A sequential client measures what each
request pays for the ingress hop; it says nothing of throughput, which N replicas raise
only where there are cores (or GPUs) for them.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

from lmgen.server.ray_app import REPLICA_HEADER


def measure(command: list[str], url: str, requests: int) -> dict[str, float]:
    started = time.perf_counter()
    # One thread for torch in both, as Ray gives each replica of --replica-cpus 1 (OMP_NUM_THREADS=1).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                sys.exit(f"{' '.join(command)} exited with {process.returncode}")
            time.sleep(0.2)
        ready = time.perf_counter() - started
        latencies, replicas = [], set()
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 1}
        with httpx.Client(timeout=60) as client:
            for i in range(requests + 5):  # the first 5 warm up
                sent = time.perf_counter()
                response = client.post(url + "/v1/chat/completions", json=body)
                response.raise_for_status()
                if i >= 5:
                    latencies.append(time.perf_counter() - sent)
                replicas.add(response.headers.get(REPLICA_HEADER))
    finally:
        stopping = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    latencies.sort()
    return {"ready_s": ready, "p50_ms": 1000 * statistics.median(latencies),
            "p90_ms": 1000 * latencies[int(0.9 * len(latencies))], "stop_s": time.perf_counter() - stopping,
            "replicas_seen": len(replicas - {None})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    base = [sys.executable, "-m", "lmgen", "serve", "--port", str(args.port)] + (
        ["--model", args.model] if args.model else [])
    url = f"http://127.0.0.1:{args.port}"
    print(f"{'server':<28}{'ready s':>9}{'p50 ms':>9}{'p90 ms':>9}{'stop s':>9}{'replicas':>10}")
    for name, command in (("lmgen serve", base),
                          (f"lmgen serve --replicas {args.replicas}", base + ["--replicas", str(args.replicas)])):
        row = measure(command, url, args.requests)
        print(f"{name:<28}{row['ready_s']:>9.1f}{row['p50_ms']:>9.1f}{row['p90_ms']:>9.1f}{row['stop_s']:>9.1f}"
              f"{row['replicas_seen']:>10}", flush=True)


if __name__ == "__main__":
    main()
