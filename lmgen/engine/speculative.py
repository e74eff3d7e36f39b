"""Speculative decoding: a request drafts the tokens it expects next, one target step checks them all.

``ngram`` (prompt lookup) drafts with no model: the tokens that followed the latest earlier
occurrence of the sequence's last n tokens, where the output copies its input (editing,
quoting, code). A drafting request computes its last token and its k drafts in one step,
like a prompt chunk, and the target scores the position after the last token and after each
draft exactly as it would without speculation had the drafts before been accepted: logits
processors and penalties see those drafts in the sequence, the grammar masks each position
(a draft it forbids has probability 0), then temperature and the warpers. The sampler then
verifies the drafts (``accept_greedy``, ``accept_sampled`` in lmgen/sampling/sampler.py):

- a greedy request accepts drafts while they are the argmax; the first disagreement (or the
  token after the last draft) is the target's own, so its output is token for token the
  output without speculation;
- a sampled request uses rejection sampling (Leviathan et al. 2023, Chen et al. 2023): draft
  x is accepted with probability min(1, p(x) / q(x)), p the target's distribution and q the
  one the draft came from (``Request.draft_probs``; one-hot for prompt lookup, which chooses
  its drafts), and the first rejected one is replaced by a draw from max(p - q, 0)
  renormalised. Every token follows exactly the distribution it follows without speculation;
  the draws come from the request's own generator, so a seed repeats its tokens.

A step yields 1 to k + 1 tokens, appended one at a time as if each came alone (stop tokens and
strings, max_tokens, one logprobs entry and one recorded score row per token). The tokens after
one that the grammar follows with forced tokens are dropped, as they were chosen without those.
Rejected drafts' cache slots are simply written again later. Beams do not draft: a beam group
chooses its tokens across its beams, one a step.

Drafting adapts per request (``SpeculativeConfig.next_limit``, transformers' "heuristic" schedule
taken down to none): two more drafts after a step that accepted all, as many as were accepted
after one that did not; a request whose drafts all fail stops drafting for a while, so that
speculation costs little where the output does not copy (a drafting step is a slower one).

Two proposers draft, behind one small interface (``Proposer``): ``NgramProposer`` and a small
draft model of the same vocabulary (``draft_model``, lmgen/engine/draft_model.py), which runs in the
same engine on its own paged KV cache. The engine asks the proposer once per step, for all the
requests that draft, and releases a request's drafting state when it finishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

import torch

from lmgen.errors import InvalidArgumentError

if TYPE_CHECKING:
    from lmgen.engine.request import Request

METHODS = ("ngram", "draft_model")

#: A request's drafts: the token ids, and the distributions they were drawn from ([k, vocab] float32 on the
#: target's device; None where they were chosen deterministically: n-gram lookup, a greedy request's argmax)
Draft = tuple[list[int], torch.Tensor | None]


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``: {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
    or {"model": "path/to/small-draft", "num_speculative_tokens": 4} (method "draft_model")."""

    method: str | None = None  # "ngram", or "draft_model"; None: "draft_model" when a model is given
    model: str | None = None  # the draft model's checkpoint (folder or hub id), of the target's vocabulary
    num_speculative_tokens: int = 5  # drafts per step at most
    prompt_lookup_max: int = 4  # the longest tail n-gram looked up
    prompt_lookup_min: int = 1  # the shortest
    # no drafts while more requests than this run (vLLM's name): their rows already fill a step's
    # arithmetic; on a 2-core AVX2 CPU drafting for 4 requests measured 0.77-0.92x of none, for 1
    # request 1.03-1.57x (docs/performance.md)
    disable_by_batch_size: int | None = 1

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "ngram" if self.model is None else "draft_model")
        if self.method not in METHODS:
            raise InvalidArgumentError(f"speculative method {self.method!r} is not supported; use one of: "
                                       f"{', '.join(METHODS)}")
        if self.method == "draft_model" and self.model is None:
            raise InvalidArgumentError("speculative_config method 'draft_model' needs a 'model': the draft "
                                       "checkpoint's folder or hub id")
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidArgumentError(f"speculative_config model must be a checkpoint's folder or hub id, got "
                                       f"{type(self.model).__name__}")
        if self.method == "ngram" and self.model is not None:
            raise InvalidArgumentError("speculative_config 'model' is for method 'draft_model'; 'ngram' drafts "
                                       "without a model")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            value = getattr(self, name)
            if name == "disable_by_batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"speculative_config {name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidArgumentError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) is more "
                                       f"than prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def of(cls, value: "SpeculativeConfig | Mapping | None") -> "SpeculativeConfig | None":
        """From a dict as vLLM takes it (unknown keys are errors)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"speculative_config must be a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidArgumentError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)

    def next_limit(self, drafted: int, accepted: int) -> int:
        """How many drafts a request may make next, after `accepted` of its `drafted` were accepted."""
        return min(self.num_speculative_tokens, drafted + 2) if accepted == drafted else accepted


class Proposer(Protocol):
    """What drafts for the engine: asked once a step for all the requests that draft."""

    config: SpeculativeConfig

    def propose(self, requests: list[Request], limits: list[int]) -> list[Draft]:
        """Each request's drafts, at most its limit (>= 1) of them (fewer, or none, where it has no guess)."""

    def release(self, request: Request) -> None:
        """Forget a finished (or aborted) request: free what drafting for it holds."""


class NgramProposer:
    """Prompt lookup: drafts copied from the request's own earlier tokens (no model, nothing to release)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, requests: list[Request], limits: list[int]) -> list[Draft]:
        return [(propose_ngram(r.all_token_ids, limit, self.config.prompt_lookup_min, self.config.prompt_lookup_max),
                 None) for r, limit in zip(requests, limits)]

    def release(self, request: Request) -> None:
        pass


def propose_ngram(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The (up to) k tokens that followed the latest earlier occurrence of the sequence's last n tokens,
    trying the longest n first (from max_n down to min_n); none if no tail recurs."""
    if k < 1:
        return []
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = token_ids[length - n:]
        first = tail[0]
        for start in range(length - n - 1, -1, -1):  # latest first: the nearest context predicts best
            if token_ids[start] == first and token_ids[start:start + n] == tail:
                return token_ids[start + n:start + n + k]
    return []

