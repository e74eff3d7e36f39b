"""A server that survives abuse: oversized bodies, clients that never read, a storm of disconnects."""

import asyncio
import copy
import json
import random
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgen import LLM, SamplingParams
from serverutil import long_llama_path, serve  # noqa: F401 (fixture)

MAX_REQUEST_BYTES = 65536
NUM_STORM_CLIENTS = 64


@pytest.fixture(scope="module")
def server(long_llama_path):
    with serve(long_llama_path, "--served-model-name", "tiny",
               "--max-request-bytes", str(MAX_REQUEST_BYTES)) as process:
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
        # the request is aborted before its tokens are all made (how many were made by then depends
        # on the machine's speed), and its KV blocks are freed while the connection is still open.
        assert server.wait_for_metric("lmgen_requests_total", lambda v: v == aborted + 1, status="abort") == aborted + 1
        wait_until_idle(server)
        assert server.metric("lmgen_generation_tokens_total") - generated < n * max_tokens  # cut short
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


# ---- fuzzing every route's schema -------------------------------------------------------------
FUZZ_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize")
# Integer fields capped so that the requests the fuzzer makes valid stay quick to serve;
# the output limits always set (left out, they default to hundreds of tokens).
SMALL_LIMITS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "min_tokens": 8, "n": 4,
                "logprobs": 5, "top_logprobs": 5}
OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           json_containers, max_leaves=10)


def from_json_schema(schema: dict, models: dict) -> st.SearchStrategy:
    """Values that follow a JSON schema as pydantic writes them (refs to `models`, anyOf, bounds)."""
    if "$ref" in schema:
        return st.deferred(lambda: from_json_schema(models[schema["$ref"].rsplit("/", 1)[1]], models))
    if "anyOf" in schema:
        return st.one_of([from_json_schema(branch, models) for branch in schema["anyOf"]])
    if "const" in schema or "enum" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        # A few of the optional fields at a time: with dozens set at random one would always be refused.
        fields = {name: from_json_schema(value, models) for name, value in schema["properties"].items()}
        required = {name: fields[name] for name in schema.get("required", ())}
        optional = sorted(set(fields) - set(required))
        if not optional:
            return st.fixed_dictionaries(required)
        return st.lists(st.sampled_from(optional), unique=True, max_size=3).flatmap(
            lambda names: st.fixed_dictionaries({**required, **{name: fields[name] for name in names}}))
    if kind == "object":
        values = schema.get("additionalProperties", {})
        value_schema = values if isinstance(values, dict) else {}
        return st.dictionaries(st.text(max_size=8), from_json_schema(value_schema, models),
                               max_size=3 if values is not False else 0)
    if kind == "array":
        min_size = schema.get("minItems", 0)
        return st.lists(from_json_schema(schema.get("items", {}), models), min_size=min_size, max_size=min_size + 3)
    simple = {"string": st.text(min_size=1, max_size=30), "number": st.floats(allow_nan=False, allow_infinity=False),
              "boolean": st.booleans(), "null": st.none(),
              "integer": st.integers(schema.get("minimum"), schema.get("maximum"))}
    return simple.get(kind, JSON_VALUES)  # no type: any JSON


def capped(schema: dict, bound: int) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = min(branch.get("maximum", bound), bound)


@pytest.fixture(scope="module")
def body_strategies(server) -> dict:
    """Per route: bodies that follow its OpenAPI schema (half), such bodies with one field set to any JSON, any JSON."""
    openapi = httpx.get(server.url + "/openapi.json").json()
    components = copy.deepcopy(openapi["components"])
    for model in components["schemas"].values():
        properties = model.get("properties", {})
        for name, bound in SMALL_LIMITS.items():
            if name in properties:
                capped(properties[name], bound)
        for name in OUTPUT_LIMITS:
            if name in properties:
                properties[name] = {"type": "integer", "minimum": 1, "maximum": SMALL_LIMITS[name]}
                model["required"] = [*model.get("required", ()), name]
        if "model" in properties:
            properties["model"] = {"const": "tiny"}  # a wrong name is a plain 404
    strategies = {}
    for path in FUZZ_ROUTES:
        reference = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        valid = from_json_schema(reference, components["schemas"])
        fields = st.sampled_from([*components["schemas"][reference["$ref"].rsplit("/", 1)[1]]["properties"], "typo"])
        mutated = st.tuples(valid, fields, JSON_VALUES).map(lambda t: {**t[0], t[1]: t[2]})
        strategies[path] = st.sampled_from([valid, valid, mutated, JSON_VALUES]).flatmap(lambda strategy: strategy)
    return strategies


@pytest.mark.parametrize("path", FUZZ_ROUTES)
@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bodies_get_an_answer_and_never_a_500(server, body_strategies, path, data):
    body = data.draw(body_strategies[path], label="body")
    # json.dumps writes NaN and Infinity, which the server's parser reads as floats: fuzzed too.
    response = server.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "server_error" not in response.text  # nor a stream that failed after it began


@pytest.mark.parametrize("fields, param", [
    ('"temperature": Infinity, "min_tokens": 2', "temperature"),  # found by fuzzing: NaN logits failed the batch
    ('"repetition_penalty": Infinity', "repetition_penalty"),
    ('"length_penalty": NaN, "use_beam_search": true, "n": 2', "length_penalty"),
    ('"repetition_penalty": 1e-300', "repetition_penalty"),  # logits divided by it overflow too
    ('"seed": 1180591620717411303424', "seed"),  # more than a generator takes
])
def test_numbers_that_would_break_sampling_are_a_400_naming_the_field(server, fields, param):
    body = '{"model": "tiny", "prompt": "Hi", "max_tokens": 4, %s}' % fields  # JSON as Python's json.dumps writes it
    response = server.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_after_the_fuzzing_the_server_is_idle_and_serves(server):
    wait_until_idle(server)
    assert server.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}).status_code == 200
