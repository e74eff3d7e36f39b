"""The FastAPI app in-process: loading states, errors after streaming began, generation_config defaults."""

import json
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from lmgen import Engine, EngineConfig, ModelNotFoundError
from lmgen.server.app import build_app
from lmgen.server.serving import ServerSettings

SETTINGS = ServerSettings(served_model_names=("tiny",))


def wait_healthy(client: TestClient) -> None:
    for _ in range(600):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the app never became healthy")


def sse_payloads(response) -> list:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_health_is_503_while_the_model_loads(llama_path):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return Engine(EngineConfig(model=str(llama_path)))

    with TestClient(build_app(SETTINGS, slow_load)) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/health").json() == {"status": "loading"}
        response = client.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading"
        assert response.headers["Retry-After"]
        assert client.get("/").status_code == 200 and client.get("/metrics").status_code == 200
        release.set()
        wait_healthy(client)
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    failures = []

    def bad_load():
        return Engine(EngineConfig(model=str(tmp_path / "missing")))

    with TestClient(build_app(SETTINGS, bad_load, on_load_failure=failures.append)) as client:
        for _ in range(600):
            if failures:
                break
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        response = client.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_load_failed"
    assert isinstance(failures[0], ModelNotFoundError)


@pytest.fixture(scope="module")
def engine(llama_path):
    return Engine(EngineConfig(model=str(llama_path)))


def test_an_error_after_streaming_began_is_a_final_sse_event(engine, monkeypatch):
    real_step = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device error")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with TestClient(build_app(SETTINGS, lambda: engine)) as client:
        wait_healthy(client)
        body = {"prompt": "Portugal is", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            payloads = sse_payloads(response)
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert "simulated device error" in error["message"] and error["type"] == "server_error"
        assert any(json.loads(p)["choices"][0]["text"] is not None for p in payloads[:-2])  # tokens came first
        # The engine loop survived: the next request is served in full.
        after = client.post("/v1/completions", json={"prompt": "Lisbon", "max_tokens": 3, "ignore_eos": True})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        metrics = client.get("/metrics").text
        assert 'lmgen_requests_total{status="error"} 1.0' in metrics


def test_fields_the_client_leaves_out_come_from_generation_config(llama_path, tmp_path):
    folder = tmp_path / "greedy-by-default"
    shutil.copytree(llama_path, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "max_new_tokens": 5}))
    with TestClient(build_app(SETTINGS, lambda: Engine(EngineConfig(model=str(folder))))) as client:
        wait_healthy(client)

        def complete(**fields):
            body = {"prompt": "Portugal is", "ignore_eos": True, **fields}
            return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        default = complete()
        assert default == complete(temperature=0, max_tokens=5)  # greedy and 5 tokens, as the checkpoint says
        assert client.post("/v1/completions", json={"prompt": "Portugal is", "ignore_eos": True}).json()[
            "usage"]["completion_tokens"] == 5
