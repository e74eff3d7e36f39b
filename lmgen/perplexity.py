"""Perplexity of a model on a text, with a sliding window (``lmgen perplexity``).

As in transformers' guide "Perplexity of fixed-length models": windows of `context`
tokens start `stride` tokens apart, and each scores only its tokens that no earlier
window scored, so every token but the first is predicted once, with at least
``context - stride`` tokens of history once the first window is past.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmgen.errors import InvalidArgumentError
from lmgen.llm import LLM
from lmgen.progress import progress

DEFAULT_CONTEXT = 512


@dataclass(frozen=True)
class Perplexity:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    num_tokens: int  # tokens scored
    num_windows: int
    context: int
    stride: int
    window_tokens: int  # tokens in the longest window: `context`, or the whole text when it is shorter


def windows(num_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; the scored ranges tile [1, num_tokens)
    except, when stride == context, each window's first token, which has no history in its window."""
    scored_until = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        yield begin, end, max(scored_until, begin + 1)
        scored_until = end
        if end == num_tokens:
            return


def perplexity(llm: LLM, text: str, context: int | None = None, stride: int | None = None) -> Perplexity:
    """Sliding-window perplexity of `llm` on `text` (tokenized as one sequence, BOS included).

    `context` defaults to 512 tokens, or the model's context length if shorter;
    `stride` to half the context.
    """
    engine = llm.engine
    if context is None:
        context = min(DEFAULT_CONTEXT, engine.max_model_len - 1)
    if stride is None:
        stride = max(1, context // 2)
    if not 2 <= context < engine.max_model_len:
        raise InvalidArgumentError(f"context must be in [2, {engine.max_model_len - 1}] for this model, got {context}")
    if not 1 <= stride <= context:
        raise InvalidArgumentError(f"stride must be in [1, context={context}], got {stride}")
    ids = engine.tokenizer.encode(text)
    if len(ids) < 2:
        raise InvalidArgumentError("the text has fewer than 2 tokens: there is nothing to predict")
    spans = list(windows(len(ids), context, stride))
    total_nll, num_scored = 0.0, 0
    for begin, end, first in progress(spans, "perplexity", "window"):
        logits = engine.score([ids[begin:end]])[0]  # row i predicts token begin + i + 1
        targets = torch.tensor(ids[first:end], device=logits.device)
        total_nll += float(F.cross_entropy(logits[first - begin - 1: end - begin - 1], targets, reduction="sum"))
        num_scored += end - first
    nll = total_nll / num_scored
    return Perplexity(math.exp(nll), nll, num_scored, len(spans), context, stride, min(context, len(ids)))
