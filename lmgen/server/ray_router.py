"""Prefix-cache-aware routing of requests to engine replicas: a Ray Serve request router.

Each replica's engine keeps the KV blocks of the prompts it has run (prefix caching), so a
request whose prompt begins like an earlier one is cheaper on the replica that ran the
earlier one. The ingress cuts the prompt's text into chunks and hashes each chunk together
with all those before it, as the engine hashes KV blocks (:func:`prefix_hashes`); the router
remembers which replicas were sent each hash (:class:`PrefixTable`) and ranks first the
replicas holding the request's longest remembered prefix, unless they are much busier than
the least busy replica, then the others from least to most busy (by the requests it has
sent each and not seen finish). Ray Serve sends the request to a replica of the first rank
that has room, else of the next.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, OrderedDict
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# About one 16-token KV block of English text: prompts that agree on fewer characters share
# no block worth routing for.
PREFIX_CHUNK_CHARS = 64
MAX_PREFIX_CHUNKS = 1024  # the first 64 KiB of a prompt decide its route
# The JSON fields holding each route's prompt, in the order the chat template or the
# engine reads them.
_PROMPT_FIELDS = {"/v1/chat/completions": ("messages",), "/v1/completions": ("prompt",),
                  "/v1/responses": ("instructions", "input")}

Replica = TypeVar("Replica", bound=Hashable)


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress hands it to an engine replica, with the hashes it is routed by."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prefix: tuple[int, ...]  # prefix_hashes of its prompt; empty for routes without one


def prompt_text(path: str, body: bytes) -> str:
    """The prompt of an OpenAI request as JSON text (its messages, prompt or input); "" when it has none."""
    fields = _PROMPT_FIELDS.get(path)
    try:
        payload = json.loads(body) if fields else None
    except ValueError:  # the replica answers it with a 400
        return ""
    if not isinstance(payload, dict):
        return ""
    return json.dumps([payload.get(name) for name in fields], ensure_ascii=False)


def prefix_hashes(text: str) -> tuple[int, ...]:
    """One hash per whole chunk of `text`, each covering the chunk and every chunk before it."""
    hashes, digest = [], b""
    end = min(len(text), PREFIX_CHUNK_CHARS * MAX_PREFIX_CHUNKS)
    for start in range(0, end - PREFIX_CHUNK_CHARS + 1, PREFIX_CHUNK_CHARS):
        chunk = text[start:start + PREFIX_CHUNK_CHARS].encode()
        digest = hashlib.blake2b(digest + chunk, digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
    return tuple(hashes)


class PrefixTable:
    """Which replicas were sent each prefix hash: the `capacity` most recently sent hashes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, set] = OrderedDict()

    def record(self, hashes: Iterable[int], replica: Hashable) -> None:
        for key in hashes:
            holders = self._holders.pop(key, set())
            holders.add(replica)
            self._holders[key] = holders
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def holders(self, hashes: Sequence[int], live: Collection[Replica]) -> set[Replica]:
        """The live replicas that were sent the longest of these prefixes any live replica was sent."""
        for key in reversed(hashes):
            found = self._holders.get(key, set()).intersection(live)
            if found:
                return found
        return set()


def rank(replicas: Sequence[Replica], holders: set[Replica], loads: Mapping[Replica, int],
         max_imbalance: int) -> list[list[Replica]]:
    """The holders first, unless each has more than `max_imbalance` requests in flight beyond the least busy
    replica; then the others, least busy first (one rank per load)."""
    least = min((loads.get(r, 0) for r in replicas), default=0)
    preferred = [r for r in replicas if r in holders]
    if not any(loads.get(r, 0) - least <= max_imbalance for r in preferred):
        preferred = []
    others = [r for r in replicas if r not in preferred]
    by_load = [[r for r in others if loads.get(r, 0) == load] for load in sorted({loads.get(r, 0) for r in others})]
    return [preferred, *by_load] if preferred else by_load


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router for :class:`ForwardedRequest` calls: prefix affinity, else least busy.

    Requests are routed out of order (no FIFOMixin), each to the replica chosen for it, so
    one request's affinity never hands its replica to another.
    """

    def initialize_state(self, max_imbalance: int = 8, capacity: int = 1 << 20) -> None:
        self.max_imbalance = max_imbalance
        self.table = PrefixTable(capacity)
        # Requests routed and not yet finished, by Ray Serve's id: each replica's load as this router made it
        # (Serve's own queue-length cache can lag behind the requests just sent).
        self.in_flight: dict[str, ReplicaID] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        # In random order: of equally busy replicas Ray Serve takes the first, and new prefixes should spread.
        by_id = {replica.replica_id: replica for replica in random.sample(candidate_replicas, len(candidate_replicas))}
        holders = self.table.holders(_prefix(pending_request), by_id.keys())
        loads = Counter(self.in_flight.values())
        if pending_request is not None:
            # Every call offers every replica, so when none has room the next try waits (backs off).
            pending_request.routing_context.should_backoff = True
        return [[by_id[rid] for rid in ids] for ids in rank(list(by_id), holders, loads, self.max_imbalance)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        self.table.record(_prefix(pending_request), replica_id)
        self.in_flight[pending_request.metadata.internal_request_id] = replica_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight.pop(internal_request_id, None)  # also called for requests a replica refused


def _prefix(pending_request: PendingRequest | None) -> tuple[int, ...]:
    """The prefix hashes of a call to EngineReplica.handle; () for other calls. (Ray Serve ships this class by
    value, so the ForwardedRequest class seen here is a copy of the ingress's: the field is read by name.)"""
    if pending_request is None or not pending_request.args:
        return ()
    return getattr(pending_request.args[0], "prefix", ())
