"""lmgen serve --replicas: two engine replicas on a local Ray Serve instance (loopback only) behind one endpoint."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve

import lmgen
from lmgen.errors import InvalidArgumentError
from lmgen.server.ray_app import APP_NAME, REPLICA_HEADER, build_app
from lmgen.server.ray_router import PrefixTable, prefix_hashes, prompt_text, rank
from serverutil import free_port, long_llama_path  # noqa: F401 (a fixture)

NUM_REPLICAS = 2
LONG = 1900  # tokens: about a second of generation, so that the request still runs when its replica is killed


@pytest.fixture(scope="module")
def ray_url(long_llama_path: Path) -> Iterator[str]:
    """The endpoint of 2 replicas of the tiny Llama, deployed from `serve run`-style arguments."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        # Ray's workers import lmgen from this checkout, whatever the environment has installed.
        root = str(Path(lmgen.__file__).parent.parent)
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        ray.init(address="local", num_cpus=NUM_REPLICAS, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": str(long_llama_path), "replicas": NUM_REPLICAS, "replica_cpus": 1, "dtype": "float32",
                             "kv_cache_memory": "16MiB", "max_num_seqs": 8}), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(url: str, text: str, **kwargs) -> tuple[str, str]:
    """The reply's text and the replica that wrote it."""
    raw = client(url).chat.completions.with_raw_response.create(
        model=None, messages=[{"role": "user", "content": text}], temperature=0, **kwargs)
    return raw.parse().choices[0].message.content, raw.headers[REPLICA_HEADER]


def replica_metric(url: str, name: str) -> dict[str, float]:
    """One metric's samples summed per replica, from the ingress's /metrics."""
    totals: dict[str, float] = {}
    for sample in _samples(url, name):
        totals[sample.labels["replica"]] = totals.get(sample.labels["replica"], 0.0) + sample.value
    return totals


def _samples(url: str, name: str) -> list[Sample]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_streamed_and_whole_chat_through_one_endpoint(ray_url):
    text, replica = chat(ray_url, "Tell me about the quick brown fox and the lazy dog.", max_tokens=8)
    stream = client(ray_url).chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Tell me about the quick brown fox and the lazy dog."}],
        temperature=0, max_tokens=8, stream=True)
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(chunks) == text and len(chunks) > 2  # streamed token by token, the same greedy text
    assert len(replica_metric(ray_url, "lmgen_requests_running")) == NUM_REPLICAS  # each replica's, labelled


def test_shared_prefix_goes_to_the_replica_holding_it(ray_url):
    before = sum(replica_metric(ray_url, "lmgen_requests_total").values())
    prefixes = [f"You are a patient teacher of {topic}. Answer in one short sentence, kindly and clearly."
                for topic in ("violins", "tides")]
    with ThreadPoolExecutor(2) as pool:
        # Two long requests, the second once the first runs: the least busy replica takes it, so each
        # replica holds one prefix.
        long = []
        for busy, prefix in enumerate(prefixes, 1):
            long.append(pool.submit(chat, ray_url, prefix + " Go on.", max_tokens=LONG, extra_body={"ignore_eos": True}))
            _wait_until(lambda: len(_running(ray_url)) == busy)
        # Equally busy replicas: only the prefix tells them apart (by chance alone, 1 in 2 each time).
        short = [[chat(ray_url, prefix + question, max_tokens=1)[1] for question in (" Why?", " How?", " When?")]
                 for prefix in prefixes]
        holders = [future.result()[1] for future in long]
    assert holders[0] != holders[1]
    assert short == [[holder] * 3 for holder in holders]
    assert sum(replica_metric(ray_url, "lmgen_requests_total").values()) == before + 8


def test_client_that_leaves_aborts_its_request_on_the_replica(ray_url):
    before = sum(replica_metric(ray_url, "lmgen_requests_total").values())
    with httpx.stream("POST", ray_url + "/v1/completions", timeout=60, json={
            "prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, "stream": True}) as response:
        replica = response.headers[REPLICA_HEADER]
        next(response.iter_lines())
    _wait_until(lambda: replica_metric(ray_url, "lmgen_requests_total").get(replica, 0) > 0 and not _running(ray_url))
    aborted = [s for s in _samples(ray_url, "lmgen_requests_total") if s.labels == {"replica": replica, "status": "abort"}]
    assert aborted and sum(replica_metric(ray_url, "lmgen_requests_total").values()) == before + 1


def test_bad_input_is_an_openai_error(ray_url):
    with pytest.raises(openai.BadRequestError) as caught:
        client(ray_url).chat.completions.create(model=None, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert caught.value.body["param"] == "temperature"
    response = httpx.post(ray_url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client(ray_url).models.retrieve("no-such-model")


def test_killed_replica_fails_its_requests_and_the_other_serves(ray_url):
    shared = "You are a storyteller who never stops. Tell a long tale about a lighthouse keeper."
    whole: list[BaseException] = []
    waiting = threading.Thread(target=lambda: _record_error(whole, ray_url, shared + " Go on."))
    waiting.start()
    _wait_until(lambda: _running(ray_url))
    [victim] = _running(ray_url)
    # The same prefix goes to the same replica: both requests are in flight there when it is killed.
    stream = client(ray_url).chat.completions.with_raw_response.create(
        model=None, messages=[{"role": "user", "content": shared + " Begin."}], max_tokens=LONG, stream=True,
        extra_body={"ignore_eos": True})
    assert stream.headers[REPLICA_HEADER] == victim
    chunks = iter(stream.parse())
    next(chunks)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#EngineReplica#{victim}", namespace="serve"))
    with pytest.raises(openai.APIError, match="replica"):
        for _ in chunks:
            pass
    waiting.join(timeout=120)
    assert isinstance(whole[0], openai.APIStatusError) and whole[0].status_code == 503
    assert whole[0].body["code"] == "replica_failed"
    for question in ("Who are you?", "What is a lighthouse?"):
        _, replica = chat(ray_url, question, max_tokens=2)
        assert replica != victim


def _wait_until(condition: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _running(url: str) -> list[str]:
    return [replica for replica, n in replica_metric(url, "lmgen_requests_running").items() if n]


def _record_error(errors: list[BaseException], url: str, text: str) -> None:
    try:
        chat(url, text, max_tokens=LONG, extra_body={"ignore_eos": True})
    except openai.APIError as exc:
        errors.append(exc)


def test_prefix_hashes_follow_the_prompt_text():
    chat_a = prompt_text("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"x" * 200 + b'"}]}')
    chat_b = prompt_text("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"x" * 150 + b"y" * 50 + b'"}]}')
    a, b = prefix_hashes(chat_a), prefix_hashes(chat_b)
    assert len(a) == len(chat_a) // 64 and a[:2] == b[:2] and a[2] != b[2]
    assert prompt_text("/v1/completions", b'{"prompt": "hi"}') == '["hi"]'
    assert prompt_text("/v1/models", b"") == prompt_text("/v1/completions", b"{bad") == ""


def test_rank_prefers_holders_unless_they_are_much_busier():
    table = PrefixTable(capacity=4)
    table.record([1, 2, 3], "a")
    table.record([1], "b")
    assert table.holders([1, 2, 9], live={"a", "b"}) == {"a"}
    assert table.holders([1, 2], live={"b", "c"}) == {"b"}
    table.record([4, 5], "c")  # past the capacity: the least recently sent hash (2) is forgotten
    assert table.holders([1, 2], live={"a", "b"}) == {"a", "b"} and table.holders([2], live={"a"}) == set()
    assert rank(["a", "b", "c"], {"b"}, {"a": 0, "b": 3}, max_imbalance=8) == [["b"], ["a", "c"]]
    assert rank(["a", "b", "c"], {"b"}, {"a": 0, "b": 9}, max_imbalance=8) == [["a", "c"], ["b"]]
    assert rank(["a", "b", "c"], set(), {"a": 2}, max_imbalance=8) == [["b", "c"], ["a"]]


def test_serve_run_arguments_are_checked_by_lmgen_serves_parser():
    with pytest.raises(InvalidArgumentError, match="replicas"):
        build_app({"replicas": 0})
    with pytest.raises(InvalidArgumentError, match="dtype"):
        build_app({"replicas": 2, "dtype": "float99"})
