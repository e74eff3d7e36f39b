"""Per-request logits processors: ``(token_ids, logits) -> logits``.

``token_ids`` is the request's whole sequence (prompt and output); ``logits`` is its
row [vocab]. Processors are closures built once per request from its parameters,
so the sampler never needs to know what a setting means. Stateful ones count tokens
incrementally, so a step costs O(new tokens), not O(sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmgen.params import SamplingParams

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def min_tokens_processor(num_prompt_tokens: int, min_tokens: int, stop_ids: frozenset[int]) -> LogitsProcessor:
    """Forbid the stop tokens until `min_tokens` tokens have been generated."""
    banned = torch.tensor(sorted(stop_ids), dtype=torch.long)

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(token_ids) - num_prompt_tokens < min_tokens:
            logits[banned.to(logits.device)] = float("-inf")
        return logits

    return process


def _token_counter(start: int, vocab_size: int) -> Callable[[Sequence[int], torch.device], torch.Tensor]:
    """Counts of each token id in token_ids[start:], updated incrementally."""
    counts = torch.zeros(vocab_size)
    seen = start

    def update(token_ids: Sequence[int], device: torch.device) -> torch.Tensor:
        nonlocal counts, seen
        if len(token_ids) > seen:
            new = torch.tensor(token_ids[seen:], dtype=torch.long)
            counts = counts.index_add(0, new, torch.ones(len(new)))
            seen = len(token_ids)
        return counts.to(device)

    return update


def openai_penalties_processor(num_prompt_tokens: int, vocab_size: int, presence: float,
                               frequency: float) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties, over the generated tokens only."""
    count = _token_counter(num_prompt_tokens, vocab_size)

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        counts = count(token_ids, logits.device)
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    return process


def repetition_penalty_processor(vocab_size: int, penalty: float) -> LogitsProcessor:
    """transformers' repetition penalty over prompt and output: divide positive logits, multiply negative ones."""
    count = _token_counter(0, vocab_size)

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        seen = count(token_ids, logits.device) > 0
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(seen, penalised, logits)

    return process


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, ids.to(logits.device), values.to(logits.device, logits.dtype))

    return process


def build_processors(params: SamplingParams, num_prompt_tokens: int, vocab_size: int,
                     stop_ids: frozenset[int]) -> list[LogitsProcessor]:
    """The processors a request's settings call for (none for most requests)."""
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(logit_bias_processor(params.logit_bias))
    if params.repetition_penalty != 1.0:
        processors.append(repetition_penalty_processor(vocab_size, params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(openai_penalties_processor(num_prompt_tokens, vocab_size, params.presence_penalty,
                                                     params.frequency_penalty))
    if params.min_tokens > 0 and stop_ids:
        processors.append(min_tokens_processor(num_prompt_tokens, params.min_tokens, stop_ids))
    return processors
