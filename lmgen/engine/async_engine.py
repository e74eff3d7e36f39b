"""AsyncEngine: one Engine on a background thread, many asyncio callers.

The Engine is not thread-safe, so exactly one thread touches it: the engine thread.
Callers on the event loop send it commands (add, abort) through a queue guarded by a
condition variable; the thread applies them between steps, runs ``step()`` while any
request is unfinished and sleeps on the condition when idle. Each step's deltas go
back to the loop in one ``call_soon_threadsafe`` call and are routed to the
``asyncio.Queue`` of their request.

Invariants:
- Everything in ``_streams`` and ``_num_sequences`` is touched only on the event loop.
- Everything in the Engine and ``_active`` is touched only on the engine thread.
- A request that fails (bad input, or a step that raised) fails alone or, for a step,
  with the batch it ran in; the loop itself keeps serving.
- With ``max_backlog``, a request whose caller has left more than that many deltas
  unread, and taken none for ``STALL_SECONDS``, is aborted (:class:`StreamBacklogError`):
  a client that stops reading a stream holds neither a batch slot nor a growing queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmgen.engine.engine import Engine
from lmgen.errors import LmgenError
from lmgen.outputs import RequestOutput, SpecDecodeStats
from lmgen.params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStoppedError(LmgenError, RuntimeError):
    """The engine is shutting down (or its thread died) and takes no more requests."""


class EngineStepError(LmgenError, RuntimeError):
    """A model step failed; the requests in it were aborted, the engine keeps serving."""


class StreamBacklogError(LmgenError, RuntimeError):
    """The caller stopped reading a request's deltas; the request was aborted to free its resources."""


#: what iterating a RequestStream may raise besides cancellation: the request ended without finishing
STREAM_ERRORS = (EngineStepError, EngineStoppedError, StreamBacklogError)
#: A reader past its backlog that took nothing for this long has stopped reading. A reader that
#: is merely behind (the event loop was busy while the engine made steps) catches up far sooner.
STALL_SECONDS = 2.0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after every loop iteration."""

    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences queued for a batch slot (the queue depth)
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_preemptions: int = 0  # total so far
    num_sampled: int = 0  # sequences that produced tokens in the last step
    num_steps: int = 0  # total so far
    spec_decode: SpecDecodeStats = SpecDecodeStats()  # speculative decoding's record so far


class EngineObserver(Protocol):
    """Hooks for metrics; every method runs on the engine thread and must be quick."""

    def request_added(self, request_id: str, arrival_time: float) -> None: ...

    def step_finished(self, outputs: list[RequestOutput], stats: EngineStats, now: float) -> None: ...

    def request_failed(self, request_id: str) -> None: ...


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    accepted: asyncio.Future
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


class _Stream:
    def __init__(self, num_sequences: int) -> None:
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.num_sequences = num_sequences
        self.last_read = time.monotonic()  # when the reader last took a delta


class RequestStream:
    """The deltas of one accepted request, in order, ending with the one marked ``finished``.

    Iterate it with ``async for``; call :meth:`abort` (idempotent) to stop the request
    early. An engine failure is raised from the iteration as :class:`EngineStepError`.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = stream
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        self._stream.last_read = time.monotonic()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def abort(self) -> None:
        """Stop the request unless it already finished; its KV blocks are freed at the next step."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Owns an :class:`Engine` on a dedicated thread; use it from one asyncio event loop.

    >>> engine = AsyncEngine(Engine(EngineConfig()))
    >>> engine.start()                                   # inside the running loop
    >>> async for delta in engine.generate("Hello", SamplingParams(max_tokens=8)):
    ...     print(delta.outputs[0].text, end="")
    >>> await engine.shutdown()
    """

    def __init__(self, engine: Engine, observer: EngineObserver | None = None, max_backlog: int | None = None) -> None:
        """`max_backlog`: most unread deltas a request may queue while its reader is stalled (None: no limit)."""
        self.engine = engine
        self.max_backlog = max_backlog
        self.stats = EngineStats()
        self._observer = observer
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}
        self._num_sequences = 0
        self._active: set[str] = set()
        self.dead: BaseException | None = None  # set when the engine thread itself crashed

    # ---- the event-loop side --------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will use this engine."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmgen-engine", daemon=True)
        self._thread.start()

    @property
    def num_unfinished_sequences(self) -> int:
        """Sequences accepted and not yet finished or aborted (a request with n = 4 counts 4)."""
        return self._num_sequences

    @property
    def running(self) -> bool:
        """True while the engine thread is serving."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises the engine's error (e.g. :class:`lmgen.InvalidArgumentError`) for bad
        input, before any delta exists; :class:`EngineStoppedError` after shutdown.
        """
        if not self.running:
            raise EngineStoppedError("the engine is not running (shut down, or never started) and takes no requests")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(params.n)
        self._streams[request_id] = stream
        self._num_sequences += params.n
        accepted = self._loop.create_future()
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        self._submit(_Add(request_id, prompt, params, accepted, time.perf_counter()))
        try:
            await accepted
        except BaseException:
            # Bad input, or the caller was cancelled while waiting: nothing may stay behind.
            self.abort(request_id)
            raise
        return RequestStream(self, request_id, stream)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas; errors in the input raise before the first one.

        Leaving early (``break``, cancellation, a closed generator) aborts the request.
        """
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is unknown or finished). Call on the event loop."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._num_sequences -= stream.num_sequences
            self._submit(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every request in flight; their callers still receive the final "abort" deltas."""
        for request_id in list(self._streams):
            self._submit(_Abort(request_id))

    async def shutdown(self) -> None:
        """Abort whatever is still running (callers see finish_reason "abort") and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)  # let the final deliveries scheduled by the thread run

    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its caller, who is gone
            stream.queue.put_nowait(output)
            if output.finished:
                del self._streams[output.request_id]
                self._num_sequences -= stream.num_sequences
            elif self._stalled(stream):
                self.abort(output.request_id)
                stream.queue.put_nowait(StreamBacklogError(
                    f"request {output.request_id} was aborted: its reader left {self.max_backlog} deltas unread "
                    f"and took none for {STALL_SECONDS:g} s"))

    def _stalled(self, stream: _Stream) -> bool:
        return (self.max_backlog is not None and stream.queue.qsize() > self.max_backlog
                and time.monotonic() - stream.last_read > STALL_SECONDS)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._num_sequences -= stream.num_sequences
                stream.queue.put_nowait(error)

    @staticmethod
    def _settle(future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return  # the caller was cancelled meanwhile; it aborts the request itself
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _to_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to tell

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug in this loop: fail loudly, never hang callers
            logger.exception("the engine thread crashed")
            self.dead = exc
            self._to_loop(self._fail_all, EngineStoppedError(f"the engine thread crashed: {exc}"))

    def _fail_all(self, error: BaseException) -> None:
        self._fail(list(self._streams), error)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for command in commands:
                self._apply(command)
            if stopping:
                for request_id in list(self._active):
                    engine.abort_request(request_id)
            if engine.has_unfinished_requests():
                self._step()
            if stopping and not engine.has_unfinished_requests():
                return

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
        except Exception as exc:  # bad input: it belongs to this caller only
            self._to_loop(self._settle, command.accepted, exc)
            return
        self._active.add(command.request_id)
        self._notify("request_added", command.request_id, command.arrival_time)
        self._to_loop(self._settle, command.accepted, None)

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as exc:
            failed = sorted(self._active)
            logger.exception("an engine step failed; aborting the %d requests in flight", len(failed))
            for request_id in failed:
                engine.abort_request(request_id)
                self._notify("request_failed", request_id)
            self._active.clear()
            self._to_loop(self._fail, failed, EngineStepError(f"generation failed: {exc}"))
            return
        for output in outputs:
            if output.finished:
                self._active.discard(output.request_id)
        scheduler = engine.scheduler
        self.stats = EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=engine.pool.usage, num_preemptions=scheduler.num_preemptions,
            # a sequence whose drafts were accepted sends one delta per token
            num_sampled=len({(o.request_id, o.outputs[0].index)
                             for o in outputs if o.outputs and o.outputs[0].token_ids}),
            num_steps=self.stats.num_steps + 1, spec_decode=engine.spec_decode)
        self._notify("step_finished", outputs, self.stats, time.perf_counter())
        if outputs:
            self._to_loop(self._deliver, outputs)

    def _notify(self, hook: str, *args) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, hook)(*args)
        except Exception:  # metrics must never stop generation
            logger.exception("engine observer %s failed", hook)
