"""Prometheus metrics, fed by the engine thread (see EngineObserver) and read at /metrics.

Latencies are measured where tokens are made: time to first token runs from the
moment a request was queued to the end of the step that sampled its first token;
inter-token latency is the gap between two consecutive tokens of one sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lmgen.engine.async_engine import EngineStats
from lmgen.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _RequestTimes:
    __slots__ = ("arrival", "first_token", "last_token", "finish_reasons", "counted_prompt")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: dict[int, float] = {}  # per sequence index
        self.finish_reasons: set[str] = set()
        self.counted_prompt = False


class Metrics:
    """The server's metrics in their own registry; an EngineObserver for the AsyncEngine."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        """`stats` returns the engine's latest snapshot (zeros while the model loads)."""
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lmgen_requests", "Finished requests by status (stop, length, abort, error)",
                                ["status"], registry=registry)
        self.prompt_tokens = Counter("lmgen_prompt_tokens", "Prompt tokens of accepted requests", registry=registry)
        self.generation_tokens = Counter("lmgen_generation_tokens", "Generated tokens", registry=registry)
        self.ttft = Histogram("lmgen_time_to_first_token_seconds", "From queueing to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("lmgen_inter_token_latency_seconds", "Between consecutive tokens of one sequence",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("lmgen_request_latency_seconds", "From queueing to the request's last delta",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("lmgen_batch_size", "Sequences that produced a token in one engine step "
                                    "(above 1: requests shared a batch)", buckets=_BATCH_BUCKETS, registry=registry)
        self.preemptions = Counter("lmgen_preemptions", "Sequences evicted from the KV cache to be recomputed",
                                   registry=registry)
        self.rejected = Counter("lmgen_requests_rejected", "Requests refused because the queue was full",
                                registry=registry)
        self.spec_decode = {  # SpecDecodeStats' counts
            "num_drafts": Counter("lmgen_spec_decode_drafts", "Speculative decoding: verifying steps (a sequence's "
                                  "step that checked drafts)", registry=registry),
            "num_draft_tokens": Counter("lmgen_spec_decode_draft_tokens", "Speculative decoding: tokens drafted",
                                        registry=registry),
            "num_accepted_tokens": Counter("lmgen_spec_decode_accepted_tokens",
                                           "Speculative decoding: drafted tokens the model agreed with",
                                           registry=registry)}
        for name, doc, read in (
            ("lmgen_requests_waiting", "Sequences queued for a batch slot", lambda s: s.num_waiting),
            ("lmgen_requests_running", "Sequences in the running batch", lambda s: s.num_running),
            ("lmgen_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", lambda s: s.kv_cache_usage),
        ):
            Gauge(name, doc, registry=registry).set_function(lambda read=read: read(stats()))
        self._times: dict[str, _RequestTimes] = {}
        self._seen = EngineStats()  # the totals already counted

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # ---- EngineObserver (engine thread) ---------------------------------------------------
    def request_added(self, request_id: str, arrival_time: float) -> None:
        self._times[request_id] = _RequestTimes(arrival_time)

    def request_failed(self, request_id: str) -> None:
        if self._times.pop(request_id, None) is not None:
            self.requests.labels("error").inc()

    def step_finished(self, outputs: list[RequestOutput], stats: EngineStats, now: float) -> None:
        if stats.num_sampled:
            self.batch_size.observe(stats.num_sampled)
        counts = [(self.preemptions, stats.num_preemptions, self._seen.num_preemptions)]
        counts += [(counter, getattr(stats.spec_decode, name), getattr(self._seen.spec_decode, name))
                   for name, counter in self.spec_decode.items()]
        for counter, total, seen in counts:
            if total > seen:
                counter.inc(total - seen)
        self._seen = stats
        for output in outputs:
            times = self._times.get(output.request_id)
            if times is not None:
                self._record(output, times, now)

    def _record(self, output: RequestOutput, times: _RequestTimes, now: float) -> None:
        if not times.counted_prompt:
            times.counted_prompt = True
            self.prompt_tokens.inc(len(output.prompt_token_ids))
        for completion in output.outputs:
            num_tokens = len(completion.token_ids)
            if num_tokens:
                self.generation_tokens.inc(num_tokens)
                if times.first_token is None:
                    times.first_token = now
                    self.ttft.observe(now - times.arrival)
                last = times.last_token.get(completion.index)
                if last is not None:
                    for _ in range(num_tokens):
                        self.itl.observe((now - last) / num_tokens)
                times.last_token[completion.index] = now
            if completion.finish_reason is not None:
                times.finish_reasons.add(completion.finish_reason)
        if output.finished:
            del self._times[output.request_id]
            self.e2e.observe(now - times.arrival)
            self.requests.labels(_status(times.finish_reasons)).inc()


def _status(finish_reasons: set[str]) -> str:
    """One status per request: an aborted sequence makes it "abort", a cut one "length"."""
    for status in ("abort", "length", "stop"):
        if status in finish_reasons:
            return status
    return "stop"


class _Families:
    """A collector of metric families read elsewhere (merge_metrics)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_metrics(expositions: Mapping[str, str], label: str) -> bytes:
    """Several servers' Prometheus text as one exposition: each family once, each sample labelled with
    `label` = the key of its server (Prometheus sums them with ``sum without (label)``)."""
    families: dict[str, Metric] = {}
    for source, text in expositions.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [sample._replace(labels={label: source, **sample.labels}) for sample in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
