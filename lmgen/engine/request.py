"""Request: one sequence's tokens, settings and progress through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmgen.cache.block_pool import chain_hash
from lmgen.outputs import Logprob, SpecDecodeStats
from lmgen.params import SamplingParams
from lmgen.sampling.structured import Matcher

if TYPE_CHECKING:
    from lmgen.engine.beam import BeamGroup


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request owns its state; a step moves ``num_computed_tokens`` toward ``num_tokens``.

    There is no separate prefill phase: a new request has computed nothing, a
    decoding one lacks exactly its last sampled token, and a preempted one starts
    over from zero with its generated tokens counted as prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: the params', else the model's default
    generator: torch.Generator
    prompt: str | None = None
    eos_token_ids: frozenset[int] = frozenset()
    parent_id: str = ""  # the caller's request id; requests with n > 1 fan out into children
    index: int = 0  # which of the parent's n completions this is
    all_token_ids: list[int] = field(init=False)
    stop_token_ids: frozenset[int] = field(init=False)  # EOS unless ignored, plus the caller's stop ids
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of the full blocks so far
    hash_salt: bytes | None = None  # what else its blocks' contents depend on (the rope regime: Scheduler)
    draft_token_ids: list[int] = field(default_factory=list)  # speculated next tokens, checked by the next step
    # [len(drafts), vocab] float32: the distribution each draft was drawn from (a draft model's); None: the
    # drafts were chosen, not drawn (prompt lookup). Rows past len(draft_token_ids) (drafts cut) are ignored
    draft_probs: torch.Tensor | None = None
    draft_limit: int | None = None  # how many it may draft next (None: the configured most)
    draft_pause: int = 0  # steps before a request whose drafts all failed drafts again
    spec_decode: SpecDecodeStats = SpecDecodeStats()  # its verifying steps so far
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    logits_processors: list = field(default_factory=list)  # see lmgen.sampling.processors
    matcher: Matcher | None = None  # the grammar state of a structured-output request
    beam: BeamGroup | None = None  # the beam-search group this request is a beam of
    # params.prompt_logprobs, scored so far (position 0's entry is None), until handed out; the first of n
    # sequences (or beams) computes them for all
    prompt_logprobs: list[dict[int, Logprob] | None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.parent_id = self.parent_id or self.request_id
        self.all_token_ids = list(self.prompt_token_ids)
        eos = frozenset() if self.params.ignore_eos else self.eos_token_ids
        self.stop_token_ids = eos | frozenset(self.params.stop_token_ids)
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def full_block_hashes(self, block_size: int, num_tokens: int) -> list[bytes]:
        """Prefix hashes of the full blocks among the first `num_tokens` tokens (computed once each)."""
        for index in range(len(self.block_hashes), min(num_tokens, self.num_tokens) // block_size):
            parent = self.block_hashes[-1] if self.block_hashes else self.hash_salt
            self.block_hashes.append(
                chain_hash(parent, self.all_token_ids[index * block_size:(index + 1) * block_size]))
        return self.block_hashes[: num_tokens // block_size]

    def append_token(self, token_id: int, max_model_len: int) -> None:
        """Add a sampled token and finish the request if it hit a token or length limit."""
        self.all_token_ids.append(token_id)
        if token_id in self.stop_token_ids:  # min_tokens is enforced by masking these before sampling
            self.finish("stop", token_id if token_id in self.params.stop_token_ids else None)
        elif self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len or self.out_of_time():
            self.finish("length")
        elif any(stop(self.all_token_ids) for stop in self.params.stopping_criteria):
            self.finish("stop")

    def out_of_time(self) -> bool:
        """params.max_time (seconds since arrival) has passed."""
        return self.params.max_time is not None and time.monotonic() - self.arrival_time > self.params.max_time

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

