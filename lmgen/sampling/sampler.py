"""The batched sampler: a pure function of logits and per-row settings.

Warpers follow transformers' definitions and order (temperature, top-k, top-p,
min-p), vectorised over rows that each carry their own values. Every row draws from
its own ``torch.Generator``, so a seeded request gets the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmgen.outputs import Logprob


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row settings, as tensors on the logits' device."""

    temperature: torch.Tensor  # [N] float; 0 = greedy
    top_k: torch.Tensor  # [N] long; 0 = off
    top_p: torch.Tensor  # [N] float; 1 = off
    min_p: torch.Tensor  # [N] float; 0 = off
    generators: list[torch.Generator]
    num_logprobs: list[int | None]

    @classmethod
    def build(cls, params: list, generators: list[torch.Generator], device: torch.device) -> "SamplingBatch":
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=column([p.temperature if not p.greedy else 0.0 for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.long),
            top_p=column([p.top_p for p in params], torch.float32),
            min_p=column([p.min_p for p in params], torch.float32),
            generators=generators,
            num_logprobs=[p.logprobs for p in params],
        )


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep tokens scoring at least the k-th best score (ties kept, as transformers does)."""
    active = top_k > 0
    if not bool(active.any()):
        return logits
    k = top_k.clamp(min=1, max=logits.shape[-1])
    sorted_desc = logits.sort(dim=-1, descending=True).values
    threshold = sorted_desc.gather(-1, (k - 1)[:, None])
    remove = (logits < threshold) & active[:, None]
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose cumulative probability is <= 1 - top_p."""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove_sorted &= active[:, None]
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    active = min_p > 0.0
    if not bool(active.any()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    remove = (probs < threshold) & active[:, None]
    return logits.masked_fill(remove, float("-inf"))


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row: argmax(p / E) with E ~ Exp(1) is an exact sample from p."""
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def top_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num: list[int | None]) -> list[dict[int, Logprob] | None]:
    """For rows that asked: the chosen token's logprob and rank, and the top-n alternatives."""
    results: list[dict[int, Logprob] | None] = []
    wanted = [n for n in num if n is not None]
    top = logprobs.topk(max(wanted), dim=-1) if wanted and max(wanted) > 0 else None
    for row, n in enumerate(num):
        if n is None:
            results.append(None)
            continue
        token = int(tokens[row])
        chosen = logprobs[row, token]
        entry = {token: Logprob(float(chosen), int((logprobs[row] > chosen).sum()) + 1)}
        if top is not None:
            for rank, (value, tid) in enumerate(zip(top.values[row, :n].tolist(), top.indices[row, :n].tolist()), 1):
                entry.setdefault(tid, Logprob(value, rank))
        results.append(entry)
    return results


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list[dict[int, Logprob] | None]]:
    """logits [N, vocab] float32 (already processed per request) -> (tokens [N], logprobs per row).

    Logprobs are those of the model's distribution (before temperature and warpers).
    """
    logprobs = logits.log_softmax(dim=-1) if any(n is not None for n in batch.num_logprobs) else None
    greedy_tokens = logits.argmax(dim=-1)
    sampled_rows = (batch.temperature > 0).nonzero().flatten().tolist()
    tokens = greedy_tokens
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        warped = logits[rows] / batch.temperature[rows, None]
        warped = apply_top_k(warped, batch.top_k[rows])
        warped = apply_top_p(warped, batch.top_p[rows])
        warped = apply_min_p(warped, batch.min_p[rows])
        drawn = _draw(warped.softmax(dim=-1), [batch.generators[r] for r in sampled_rows])
        tokens = greedy_tokens.clone()
        tokens[rows] = drawn
    lp = top_logprobs(logprobs, tokens, batch.num_logprobs) if logprobs is not None else [None] * len(tokens)
    return tokens, lp
