"""Per-request logits processors: ``(token_ids, logits) -> logits``.

``token_ids`` is the request's whole sequence (prompt and output); ``logits`` is its
row [vocab]. Processors are closures built once per request from its parameters,
so the sampler never needs to know what a setting means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def min_tokens_processor(num_prompt_tokens: int, min_tokens: int, stop_ids: frozenset[int]) -> LogitsProcessor:
    """Forbid the stop tokens until `min_tokens` tokens have been generated."""
    banned = torch.tensor(sorted(stop_ids), dtype=torch.long)

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(token_ids) - num_prompt_tokens < min_tokens:
            logits[banned.to(logits.device)] = float("-inf")
        return logits

    return process


def build_processors(num_prompt_tokens: int, min_tokens: int, stop_ids: frozenset[int]) -> list[LogitsProcessor]:
    """The processors a request's settings call for (none for most requests)."""
    processors: list[LogitsProcessor] = []
    if min_tokens > 0 and stop_ids:
        processors.append(min_tokens_processor(num_prompt_tokens, min_tokens, stop_ids))
    return processors
