"""AsyncEngine: one engine thread, many asyncio callers; errors stay with their request."""

import asyncio

import pytest

from lmgen import Engine, EngineConfig, InvalidArgumentError, SamplingParams
from lmgen.engine import async_engine as async_engine_module
from lmgen.engine.async_engine import AsyncEngine, EngineStepError, EngineStoppedError, StreamBacklogError

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_path):
    return Engine(EngineConfig(model=str(llama_path)))


class StepRecorder:
    """An EngineObserver that keeps how many sequences each step sampled."""

    def __init__(self):
        self.sampled = []
        self.added = []
        self.failed = []

    def request_added(self, request_id, arrival_time):
        self.added.append(request_id)

    def step_finished(self, outputs, stats, now):
        self.sampled.append(stats.num_sampled)

    def request_failed(self, request_id):
        self.failed.append(request_id)


def run(engine, scenario, observer=None, max_backlog=None):
    """Run `scenario(async_engine)` on a fresh AsyncEngine around `engine`, then shut it down."""

    async def main():
        async_engine = AsyncEngine(engine, observer, max_backlog)
        async_engine.start()
        try:
            return await scenario(async_engine)
        finally:
            await async_engine.shutdown()

    return asyncio.run(main())


async def collect(async_engine, prompt, params=GREEDY):
    deltas = [d async for d in async_engine.generate(prompt, params)]
    return deltas


def test_generate_streams_deltas_like_the_engine(engine):
    deltas = run(engine, lambda e: collect(e, "Portugal is"))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 6
    direct_id = engine.add_request("Portugal is", GREEDY)
    direct = []
    while engine.has_unfinished_requests():
        direct += [o.outputs[0].token_ids for o in engine.step() if o.request_id == direct_id]
    assert [t for d in deltas for t in d.outputs[0].token_ids] == [t for ids in direct for t in ids]


def test_concurrent_requests_share_steps(engine):
    recorder = StepRecorder()

    async def scenario(e):
        return await asyncio.gather(*(collect(e, f"prompt {i}") for i in range(8)))

    results = run(engine, scenario, recorder)
    assert all(sum(len(d.outputs[0].token_ids) for d in deltas) == 6 for deltas in results)
    assert max(recorder.sampled) > 1 and len(recorder.added) == 8


def test_bad_input_raises_before_streaming_and_the_engine_keeps_serving(engine):
    async def scenario(e):
        with pytest.raises(InvalidArgumentError, match="prompt is empty"):
            await e.add_request("", GREEDY)
        with pytest.raises(InvalidArgumentError, match="token ids"):
            async for _ in e.generate([10**9], GREEDY):
                pytest.fail("no delta may come out of a refused request")
        assert e.num_unfinished_sequences == 0
        return await collect(e, "still serving")

    assert run(engine, scenario)[-1].finished


def test_leaving_early_aborts_and_frees_the_kv_blocks(engine):
    async def scenario(e):
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        async for delta in e.generate("a long one", params):
            assert e.engine is engine
            break
        await asyncio.sleep(0)  # let the generator's cleanup run
        for _ in range(200):
            if e.stats.kv_cache_usage == 0 and e.stats.num_running == 0:
                break
            await asyncio.sleep(0.02)
        return e.num_unfinished_sequences, e.stats

    in_flight, stats = run(engine, scenario)
    assert in_flight == 0 and stats.kv_cache_usage == 0 and stats.num_running == 0
    assert not engine.has_unfinished_requests()


def test_a_stream_nobody_reads_is_aborted_at_the_backlog_and_the_others_go_on(engine, monkeypatch):
    monkeypatch.setattr(async_engine_module, "STALL_SECONDS", 0.0)  # past the backlog is stalled at once
    max_backlog = 8

    async def scenario(e):
        unread = await e.add_request("nobody reads this", SamplingParams(max_tokens=240, ignore_eos=True))
        read = await collect(e, "this one is read")
        while e.num_unfinished_sequences:
            await asyncio.sleep(0.01)
        deltas = []
        with pytest.raises(StreamBacklogError, match="unread"):
            async for delta in unread:
                deltas.append(delta)
        return read, deltas

    read, deltas = run(engine, scenario, max_backlog=max_backlog)
    assert read[-1].finished and sum(len(d.outputs[0].token_ids) for d in read) == 6
    assert len(deltas) == max_backlog + 1 and not deltas[-1].finished  # what was queued, then the error
    assert not engine.has_unfinished_requests()


def test_a_reader_that_is_behind_but_reading_is_not_aborted(engine, monkeypatch):
    monkeypatch.setattr(async_engine_module, "STALL_SECONDS", 5.0)  # far longer than the engine needs for 3 steps

    async def scenario(e):
        stream = await e.add_request("read late", SamplingParams(max_tokens=20, ignore_eos=True))
        deltas = [await anext(stream)]
        while stream._stream.queue.qsize() <= 2:  # fall behind: the backlog passes max_backlog
            await asyncio.sleep(0.01)
        return deltas + [delta async for delta in stream]

    deltas = run(engine, scenario, max_backlog=2)
    assert deltas[-1].finished and sum(len(d.outputs[0].token_ids) for d in deltas) == 20


def test_a_cancelled_consumer_aborts_its_request(engine):
    async def scenario(e):
        async def consume():
            return await collect(e, "cancel me", SamplingParams(max_tokens=500, ignore_eos=True))

        task = asyncio.create_task(consume())
        while e.stats.num_steps < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return e.num_unfinished_sequences

    assert run(engine, scenario) == 0


def test_a_failing_step_fails_its_requests_not_the_loop(engine, monkeypatch):
    recorder = StepRecorder()
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def scenario(e):
        with pytest.raises(EngineStepError, match="simulated kernel failure"):
            await collect(e, "doomed", SamplingParams(max_tokens=50, ignore_eos=True))
        return await collect(e, "after the failure")

    deltas = run(engine, scenario, recorder)
    assert deltas[-1].finished and sum(len(d.outputs[0].token_ids) for d in deltas) == 6
    assert len(recorder.failed) == 1


def test_shutdown_aborts_in_flight_requests_and_refuses_new_ones(engine):
    async def main():
        e = AsyncEngine(engine)
        e.start()
        stream = await e.add_request("long", SamplingParams(max_tokens=500, ignore_eos=True))
        await e.shutdown()
        deltas = [d async for d in stream]
        with pytest.raises(EngineStoppedError):
            await e.add_request("late", GREEDY)
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "abort"
