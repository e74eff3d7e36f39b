"""Run a real `lmgen serve` process for tests and read its /metrics; checkpoint fixtures.

(No conftest.py here: a second module named "conftest" would shadow tests/conftest.py
for the modules that import from it. Test modules import these fixtures by name.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import lmgen
from checkpoints import BASE, build_tokenizer
from lmgen import Engine, EngineConfig
from lmgen.server.app import build_app
from lmgen.server.serving import ServerSettings

DEMO_MODEL = Path(lmgen.__file__).parent / "demo_model"

STARTUP_TIMEOUT_S = 180  # importing torch and loading on a loaded 2-core machine can be slow
SHUTDOWN_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running server: its URL, an OpenAI client factory, its metrics, and a graceful stop."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, model_name: str,
                 api_key: str | None) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path
        self.model = model_name
        self.api_key = api_key

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", self.api_key or "unused")
        return openai.AsyncOpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kwargs)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers(), **(headers or {})}, timeout=120, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics as {(name, sorted label items): value}."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_for_metric(self, name: str, predicate, timeout: float = 60, **labels: str) -> float:
        """Poll /metrics until `predicate(value)` holds; returns the value (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (once) and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server ignored signal {sig} for {SHUTDOWN_TIMEOUT_S} s:\n{self.log()}")


@contextlib.contextmanager
def serve(model: Path | str | None, *args: str, env: dict[str, str] | None = None,
          api_key: str | None = None) -> Iterator[ServerProcess]:
    """Start `lmgen serve [--model MODEL] ARGS` on a free port; stop it with SIGTERM and check it exits 0.

    With `model` None the server runs its default, the embedded demo model.
    """
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="lmgen-serve-", suffix=".log", delete=False)
    model_args = [] if model is None else ["--model", str(model)]
    command = [sys.executable, "-m", "lmgen", "serve", *model_args, "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    name = args[args.index("--served-model-name") + 1] if "--served-model-name" in args else str(model)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", Path(log_file.name), name, api_key)
    try:
        _wait_until_healthy(server)
        yield server
    finally:
        code = server.stop()
        log_file.close()
        log = server.log()
        server.log_path.unlink()
    assert code == 0, f"the server exited with {code} after SIGTERM:\n{log}"


@contextlib.contextmanager
def in_process(model: Path) -> Iterator[TestClient]:
    """The server's app on `model` (served as "tiny") in this process, through FastAPI's TestClient, once it
    has loaded."""
    settings = ServerSettings(served_model_names=("tiny",))
    with TestClient(build_app(settings, lambda: Engine(EngineConfig(model=str(model))))) as client:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client


def _wait_until_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"lmgen serve exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"lmgen serve was not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="module")
def tiny_server(llama_path) -> Iterator[ServerProcess]:
    """`lmgen serve` of the tiny random Llama (256-token context) as model "tiny"."""
    with serve(llama_path, "--served-model-name", "tiny") as process:
        yield process


@pytest.fixture(scope="session")
def long_llama_path(tmp_path_factory) -> Path:
    """The tiny random Llama with a 2048-token context: requests that must still be running
    when the test acts on them (disconnect, stop) ask for ~2000 tokens (about a second)."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("llama-long")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, "max_position_embeddings": 2048, "tie_word_embeddings": True})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def demo_model_path(llama_path) -> Path:
    """The embedded demo model; the tiny random Llama until the demo's weights exist."""
    return DEMO_MODEL if (DEMO_MODEL / "config.json").is_file() else llama_path
