"""Token-budget scheduler: chunked prefill and decode in one batch, preemption by recompute.

Each step hands out at most ``max_num_batched_tokens`` tokens. Running requests go
first (a decoding one needs one token, a partly prefilled one the next chunk of its
prompt); waiting requests are admitted with what is left, first come first served. On a
CPU a step costs about its token count, so the order in which prompts are served decides
every time to first token: first come first served finishes the k-th of a burst of equal
prompts as early as any order can. A long prompt ahead of short ones would hold them all
back, though: with ``max_num_partial_prefills`` N > 1 (opt-in), while other prompts wait one
takes at most 1/N of the budget a step, so the prompts behind it share the step (vLLM's
partial prefills); what they leave goes back to the capped ones, in order, so the step stays
full. When the KV pool runs dry, the most recently admitted running request is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later.
Nothing is lost.

A model whose rope changes for the whole sequence once it grows past a length (longrope:
Phi-3's long factors) has a request recompute its cache when it crosses that length, as
transformers does; its prefix-cache hashes name the regime, so cached blocks of the other
one are never reused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from lmgen.cache.block_pool import BlockPool
from lmgen.engine.request import Request, RequestStatus

LONG_ROPE = b"long rope"  # the prefix-cache salt of blocks computed with longrope's long factors


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in one batch
    max_num_batched_tokens: int = 512  # tokens in one step (the prefill chunk size, too)
    max_num_partial_prefills: int = 1  # >1: prompts that share a step's budget while more than one waits
    block_size: int = 16
    enable_prefix_caching: bool = True
    rope_switch_length: int | None = None  # past this many tokens the model's rope changes (ModelSpec)


class PlainSequence(Protocol):
    """What a step reads of a sequence that is not a Request (a draft model's, lmgen/engine/draft_model.py): its
    tokens and its KV cache, and nothing to check, score or stop."""

    all_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int  # the leading tokens whose keys and values are in its blocks

    @property
    def num_tokens(self) -> int: ...


@dataclass
class ScheduledBatch:
    """What one step computes: for each request, how many of its tokens."""

    requests: list[Request] | list[PlainSequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination): copy before the step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hit_tokens = 0  # of which found there

    def add(self, request: Request, front: bool = False) -> None:
        """Queue a request; `front` for work already under way (a beam forked from a running one)."""
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        chunk = self._prompt_chunk()
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            if self._change_rope_regime(request):
                self._release(request)  # its cache holds the other rope: recompute all of it
            missing = min(request.num_tokens - request.num_computed_tokens, chunk)  # a drafting one misses 1 token
            del request.draft_token_ids[max(budget - missing, 0):]  # drafts are checked whole or not at all
            n = min(missing + len(request.draft_token_ids), budget)
            if n == 0:
                continue  # a beam that has its next-token scores and waits for the rest of its group
            if not self._make_room(request, n, batch):
                continue
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        if not batch.preempted:  # no blocks to spare for newcomers when running ones were evicted
            budget = self._admit_waiting(batch, budget, chunk)
            self._extend_capped_chunks(batch, budget)
        return batch

    def _extend_capped_chunks(self, batch: ScheduledBatch, budget: int) -> None:
        """Hand the budget the step's prompts left to those capped at their share, in order."""
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            extra = min(request.num_tokens - request.num_computed_tokens - n, budget)
            if extra <= 0 or request.draft_token_ids:
                continue
            if not self._allocate(request, request.num_computed_tokens + n + extra, batch):
                return
            batch.num_new_tokens[i] += extra
            budget -= extra

    def _prompt_chunk(self) -> int:
        """The most tokens of its prompt one request computes this step: the whole budget when one prompt (or
        none) is pending, else its share."""
        budget = self.config.max_num_batched_tokens
        pending = len(self.waiting) + sum(r.num_tokens - r.num_computed_tokens > 1 for r in self.running)
        return budget if pending <= 1 else -(-budget // self.config.max_num_partial_prefills)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, chunk: int) -> int:
        """Admit waiting requests first come first served, each with at most `chunk` tokens; the budget left."""
        while self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs and not self._preempt_idle(batch):
                break
            request = self.waiting[0]
            if self._change_rope_regime(request):
                self._release(request)
            # Prompt logprobs need every prompt position's logits: such a request looks nothing up, nor do the
            # other sequences of its family, so the first (which scores the prompt) is done with the prompt first
            looks_up = self.config.enable_prefix_caching and request.params.prompt_logprobs is None
            if request.num_computed_tokens == 0 and looks_up:
                self._reuse_cached_prefix(request)
            n = min(request.num_tokens - request.num_computed_tokens, chunk, budget)
            if not self._allocate(request, request.num_computed_tokens + n, batch):
                self._release(request)
                if self._preempt_idle(batch) or self._release_waiting_blocks():
                    continue
                break
            self.waiting.popleft()
            if looks_up:  # counted once admitted, not per attempt
                self.num_prefix_query_tokens += request.num_tokens
                self.num_prefix_hit_tokens += request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        return budget

    def _change_rope_regime(self, request: Request) -> bool:
        """Whether the request just grew into the other rope regime (then its hashes name the new one)."""
        switch = self.config.rope_switch_length
        regime = LONG_ROPE if switch is not None and request.num_tokens > switch else None
        if regime == request.hash_salt:
            return False
        request.hash_salt, request.block_hashes = regime, []
        return True

    def _reuse_cached_prefix(self, request: Request) -> None:
        """Start the request after the longest cached prefix of its tokens.

        The last token is never taken from the cache: its logits are needed to sample.
        """
        bs = self.config.block_size
        hits = self.pool.lookup(request.full_block_hashes(bs, request.num_tokens - 1))
        self.pool.take(hits)
        request.block_ids = hits
        request.num_cached_blocks = len(hits)
        request.num_computed_tokens = len(hits) * bs

    def commit(self, batch: ScheduledBatch) -> None:
        """After the model ran: advance each request and cache the blocks it filled."""
        bs = self.config.block_size
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
            if not self.config.enable_prefix_caching:
                continue
            hashes = request.full_block_hashes(bs, request.num_computed_tokens)
            for index in range(request.num_cached_blocks, len(hashes)):
                self.pool.cache(request.block_ids[index], hashes[index])
            request.num_cached_blocks = len(hashes)

    def _make_room(self, request: Request, n: int, batch: ScheduledBatch) -> bool:
        """Allocate blocks for `n` more tokens, preempting from the back; False if `request` was preempted.

        Blocks nobody is computing with go first: those of idle beams and of queued forks.
        """
        while not self._allocate(request, request.num_computed_tokens + n, batch):
            if self._preempt_idle(batch) or self._release_waiting_blocks():
                continue
            victim = self.running[-1]
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _allocate(self, request: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for the first `num_tokens` tokens, and a private copy of a shared block about to be written."""
        bs = self.config.block_size
        needed = -(-num_tokens // bs) - len(request.block_ids)
        # A forked sequence (beam, n > 1) shares its parent's blocks; the one it writes next is copied first.
        write = request.num_computed_tokens // bs
        shared = write < len(request.block_ids) and self.pool.ref_count(request.block_ids[write]) > 1
        if max(needed, 0) + shared > self.pool.num_free_blocks:
            return False
        if shared:
            batch.block_copies.append(self.pool.copy_on_write(request.block_ids, write))
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        return True

    def _preempt_idle(self, batch: ScheduledBatch) -> bool:
        """Preempt the latest running request with nothing to compute; False if there is none.

        Only a beam waiting for the rest of its group is idle. It has handed its scores
        in, so it goes to the back of the queue: its siblings must not wait for its blocks.
        """
        for request in reversed(self.running):
            if request.num_computed_tokens == request.num_tokens:
                self._preempt(request)
                self.waiting.remove(request)
                self.waiting.append(request)
                batch.preempted.append(request)
                return True
        return False

    def _release_waiting_blocks(self) -> bool:
        """Free the blocks of the latest queued request that holds some (a beam forked while queued); False if none."""
        for request in reversed(self.waiting):
            if request.block_ids:
                self._release(request)
                return True
        return False

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _release(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids, request.draft_token_ids, request.draft_probs = [], [], None
        request.num_computed_tokens = request.num_cached_blocks = 0

    def finish(self, request: Request) -> None:
        """Drop a finished request (any reason) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
