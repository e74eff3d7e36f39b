"""Many clients at once share the engine's batches; a client that leaves frees its request."""

import asyncio

import httpx
import pytest

from serverutil import long_llama_path, serve  # noqa: F401 (fixture)

NUM_CLIENTS = 32


@pytest.fixture(scope="module")
def server(long_llama_path):
    with serve(long_llama_path, "--served-model-name", "tiny") as process:
        yield process


def test_concurrent_streams_each_get_exactly_their_tokens(server):
    before = server.metrics()
    lengths = [3 + i % 9 for i in range(NUM_CLIENTS)]
    client = server.async_client()

    async def one(index: int, max_tokens: int) -> tuple[int, int, str]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {index}"}], max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        num_chunks, usage, finish = 0, None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if not choice.delta.role:
                    num_chunks += 1
                finish = choice.finish_reason or finish
        return num_chunks, usage.completion_tokens, finish

    async def all_clients():
        return await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))

    results = asyncio.run(all_clients())
    assert results == [(n, n, "length") for n in lengths]
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("lmgen_requests_total", status="length") == NUM_CLIENTS
    assert delta("lmgen_generation_tokens_total") == sum(lengths)
    # Steps that sampled more than one sequence: the requests ran in shared batches.
    shared_steps = delta("lmgen_batch_size_count") - delta("lmgen_batch_size_bucket", le="1.0")
    assert shared_steps > 0
    assert after[("lmgen_batch_size_sum", ())] - before.get(("lmgen_batch_size_sum", ()), 0) == sum(lengths)


def wait_until_idle(server) -> None:
    server.wait_for_metric("lmgen_requests_running", lambda v: v == 0)
    server.wait_for_metric("lmgen_kv_cache_usage_ratio", lambda v: v == 0)


def test_a_dropped_stream_is_aborted_and_frees_its_kv_blocks(server):
    wait_until_idle(server)
    baseline_usage = server.metric("lmgen_kv_cache_usage_ratio")
    aborted = server.metric("lmgen_requests_total", status="abort")
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # read with next(): leaving a for loop would close the connection
        num_events = 0
        while num_events < 3:
            num_events += next(lines).startswith("data:")
        assert server.metric("lmgen_kv_cache_usage_ratio") > baseline_usage  # it holds blocks now
    # The client is gone: the request is aborted, not run to 2000 tokens.
    assert server.wait_for_metric("lmgen_requests_total", lambda v: v == aborted + 1, status="abort") == aborted + 1
    assert server.wait_for_metric("lmgen_kv_cache_usage_ratio", lambda v: v == baseline_usage) == baseline_usage
    assert server.metric("lmgen_requests_running") == 0


def test_a_client_that_gives_up_on_a_long_request_aborts_it(server):
    wait_until_idle(server)
    aborted = server.metric("lmgen_requests_total", status="abort")
    # 2000 tokens take the tiny model about a second; the client waits a fifth of that
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.2,
                   json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True})
    assert server.wait_for_metric("lmgen_requests_total", lambda v: v == aborted + 1, status="abort") == aborted + 1
    assert server.wait_for_metric("lmgen_kv_cache_usage_ratio", lambda v: v == 0) == 0
