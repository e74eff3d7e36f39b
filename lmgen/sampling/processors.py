"""Per-request logits processors: ``(token_ids, logits) -> logits``.

``token_ids`` is the request's whole sequence (prompt and output); ``logits`` is its
row [vocab]. Processors are closures built once per request from its parameters, in
transformers' order (see :func:`build_processors`), so the sampler never needs to know
what a setting means. Stateful ones index tokens incrementally, so a step costs
O(new tokens), not O(sequence). Warpers (temperature, top-k, ...) are batched in
:mod:`lmgen.sampling.sampler` and run after these.

With speculative decoding a processor also scores the positions after drafts: it is then
given a :class:`WithDrafts`, the sequence followed by the drafts before that position.
Drafts may be rejected, so stateful processors index only the tokens before them (a
request's own tokens only grow) and take the drafts into account afresh at each call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from lmgen.errors import InvalidArgumentError
from lmgen.params import SamplingParams

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


class WithDrafts(list):
    """A request's tokens followed by the last `num_drafts` of them: drafts not accepted yet."""

    def __init__(self, token_ids: Sequence[int], num_drafts: int) -> None:
        super().__init__(token_ids)
        self.num_drafts = num_drafts


def num_settled(token_ids: Sequence[int]) -> int:
    """How many of `token_ids` are the request's own (the rest are drafts, which may still be rejected)."""
    return len(token_ids) - getattr(token_ids, "num_drafts", 0)


def _on_device(tensor: torch.Tensor) -> Callable[[torch.device], torch.Tensor]:
    """`tensor` on a given device, copied there once (processors learn the device from the logits)."""
    copies: dict[torch.device, torch.Tensor] = {}

    def get(device: torch.device) -> torch.Tensor:
        if device not in copies:
            copies[device] = tensor.to(device)
        return copies[device]

    return get


def min_tokens_processor(num_prompt_tokens: int, min_tokens: int, stop_ids: frozenset[int]) -> LogitsProcessor:
    """Forbid the stop tokens until `min_tokens` tokens have been generated (transformers' min_new_tokens)."""
    banned = _on_device(torch.tensor(sorted(stop_ids), dtype=torch.long))

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(token_ids) - num_prompt_tokens < min_tokens:
            logits[banned(logits.device)] = NEG_INF
        return logits

    return process


def _token_counter(start: int, vocab_size: int) -> Callable[[Sequence[int], torch.device], torch.Tensor]:
    """Counts of each token id in token_ids[start:], updated incrementally (drafts counted at each call)."""
    counts = torch.zeros(vocab_size)
    seen = start

    def update(token_ids: Sequence[int], device: torch.device) -> torch.Tensor:
        nonlocal counts, seen
        settled = num_settled(token_ids)
        if settled > seen:
            new = torch.tensor(token_ids[seen:settled], dtype=torch.long)
            counts = counts.index_add(0, new, torch.ones(len(new)))
            seen = settled
        drafts = token_ids[max(settled, start):]
        if drafts:
            return counts.index_add(0, torch.tensor(drafts, dtype=torch.long), torch.ones(len(drafts))).to(device)
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
    ids = _on_device(torch.tensor(list(bias), dtype=torch.long))
    values = _on_device(torch.tensor(list(bias.values()), dtype=torch.float32))

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, ids(logits.device), values(logits.device).to(logits.dtype))

    return process


def sequence_bias_processor(sequence_bias: dict[tuple[int, ...], float], vocab_size: int) -> LogitsProcessor:
    """transformers' sequence_bias: a sequence's bias goes on its last token whenever the
    sequence so far ends with the tokens before it (always, for one-token sequences)."""
    always = torch.zeros(vocab_size)
    continuations: dict[tuple[int, ...], list[tuple[int, float]]] = defaultdict(list)
    for sequence, bias in sequence_bias.items():
        if len(sequence) == 1:
            always[sequence[0]] = bias
        else:
            continuations[sequence[:-1]].append((sequence[-1], bias))
    prefix_lengths = sorted({len(prefix) for prefix in continuations})
    base = _on_device(always)

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        bias = base(logits.device)
        matched = [c for n in prefix_lengths if n <= len(token_ids)
                   for c in continuations.get(tuple(token_ids[len(token_ids) - n:]), ())]
        if matched:
            ids, values = (torch.tensor(column, device=logits.device) for column in zip(*matched))
            bias = bias.index_add(0, ids, values)
        return logits + bias

    return process


def bad_words_processor(bad_words: Sequence[tuple[int, ...]], stop_ids: frozenset[int],
                        vocab_size: int) -> LogitsProcessor | None:
    """transformers' bad_words_ids: a -inf sequence bias; a single stop token is never banned."""
    banned = {word: NEG_INF for word in bad_words if not (len(word) == 1 and word[0] in stop_ids)}
    return sequence_bias_processor(banned, vocab_size) if banned else None


def no_repeat_ngram_processor(n: int) -> LogitsProcessor:
    """transformers' no_repeat_ngram_size: ban each token that would repeat an n-gram of the sequence."""
    followers: dict[tuple[int, ...], set[int]] = defaultdict(set)  # (n-1)-gram -> tokens seen right after it
    num_indexed = n - 1  # the n-grams ending before this position are in `followers`

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        nonlocal num_indexed
        settled = num_settled(token_ids)
        for end in range(num_indexed, settled):
            followers[tuple(token_ids[end - n + 1:end])].add(token_ids[end])
        num_indexed = max(num_indexed, settled)
        if len(token_ids) < n:
            return logits
        tail = tuple(token_ids[len(token_ids) - n + 1:])
        banned = followers.get(tail, set()) | {token_ids[end] for end in range(max(settled, n - 1), len(token_ids))
                                               if tuple(token_ids[end - n + 1:end]) == tail}  # n-grams ending in drafts
        if not banned:
            return logits
        return logits.index_fill(0, torch.tensor(sorted(banned), device=logits.device), NEG_INF)

    return process


def forced_tokens_processor(forced: Sequence[int], at_length: int) -> LogitsProcessor:
    """Leave only `forced` possible (score 0, the rest -inf) when the sequence is `at_length` tokens long."""
    ids = _on_device(torch.tensor(forced, dtype=torch.long))

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(token_ids) != at_length:
            return logits
        return torch.full_like(logits, NEG_INF).index_fill(0, ids(logits.device), 0.0)

    return process


def remove_invalid_values(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
    """transformers' remove_invalid_values: NaN -> 0, +-inf -> the dtype's largest finite values."""
    return torch.nan_to_num(logits)


def exponential_decay_processor(start: int, factor: float, num_prompt_tokens: int,
                                stop_ids: frozenset[int]) -> LogitsProcessor:
    """transformers' exponential_decay_length_penalty: `k` tokens past `start` new ones, each finite stop
    token's score s becomes s + |s| * (factor**k - 1)."""
    stops = _on_device(torch.tensor(sorted(stop_ids), dtype=torch.long))

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        past = len(token_ids) - num_prompt_tokens - start
        if past <= 0:
            return logits
        ids = stops(logits.device)
        scores = logits[ids]
        penalty = (scores.abs() * (factor ** past - 1)).masked_fill(~scores.isfinite(), 0.0)
        return logits.index_add(0, ids, penalty)

    return process


def suppress_tokens_processor(suppressed: Sequence[int], at_length: int | None = None) -> LogitsProcessor:
    """Forbid the `suppressed` tokens: always, or only when the sequence is `at_length` tokens long."""
    ids = _on_device(torch.tensor(sorted(set(suppressed)), dtype=torch.long))

    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if at_length is not None and len(token_ids) != at_length:
            return logits
        return logits.index_fill(0, ids(logits.device), NEG_INF)

    return process


def _check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Token ids the processors index with must exist in the model's vocabulary."""
    ids = {*params.suppress_tokens, *params.begin_suppress_tokens, *params.forced_eos_token_id,
           *(t for word in params.bad_words_ids for t in word), *(t for seq in params.sequence_bias or {} for t in seq)}
    if params.forced_bos_token_id is not None:
        ids.add(params.forced_bos_token_id)
    bad = sorted(t for t in ids if t >= vocab_size)
    if bad:
        raise InvalidArgumentError(f"The model vocabulary size is {vocab_size}, but these token ids were given to "
                                   f"the logits processors: {bad[:5]}")


def _bias_processors(params: SamplingParams, num_prompt_tokens: int, vocab_size: int,
                     stop_ids: frozenset[int]) -> list[LogitsProcessor | None]:
    """Biases, penalties and bans: transformers' sequence_bias, repetition_penalty, no_repeat_ngram_size and
    bad_words_ids, with lmgen's logit_bias and OpenAI's penalties beside their kin."""
    p = params
    return [
        logit_bias_processor(p.logit_bias) if p.logit_bias else None,
        sequence_bias_processor(p.sequence_bias, vocab_size) if p.sequence_bias else None,
        repetition_penalty_processor(vocab_size, p.repetition_penalty) if p.repetition_penalty != 1.0 else None,
        openai_penalties_processor(num_prompt_tokens, vocab_size, p.presence_penalty, p.frequency_penalty)
        if p.presence_penalty or p.frequency_penalty else None,
        no_repeat_ngram_processor(p.no_repeat_ngram_size) if p.no_repeat_ngram_size else None,
        bad_words_processor(p.bad_words_ids, stop_ids, vocab_size) if p.bad_words_ids else None,
    ]


def _position_processors(params: SamplingParams, num_prompt_tokens: int, stop_ids: frozenset[int],
                         max_tokens: int) -> list[LogitsProcessor | None]:
    """What depends on the position: min length, forced BOS/EOS, length penalty, suppressions."""
    p = params
    forces_bos = p.forced_bos_token_id is not None and num_prompt_tokens == 1  # transformers: at length 1 only
    decay = p.exponential_decay_length_penalty
    return [
        min_tokens_processor(num_prompt_tokens, p.min_tokens, stop_ids) if p.min_tokens > 0 and stop_ids else None,
        forced_tokens_processor([p.forced_bos_token_id], at_length=1) if forces_bos else None,
        forced_tokens_processor(p.forced_eos_token_id, at_length=num_prompt_tokens + max_tokens - 1)
        if p.forced_eos_token_id else None,
        remove_invalid_values if p.remove_invalid_values else None,
        exponential_decay_processor(*decay, num_prompt_tokens, stop_ids) if decay and stop_ids else None,
        suppress_tokens_processor(p.suppress_tokens) if p.suppress_tokens else None,
        suppress_tokens_processor(p.begin_suppress_tokens, at_length=num_prompt_tokens + forces_bos)
        if p.begin_suppress_tokens else None,
    ]


def build_processors(params: SamplingParams, num_prompt_tokens: int, vocab_size: int, stop_ids: frozenset[int],
                     max_tokens: int) -> list[LogitsProcessor]:
    """The processors a request's settings call for (none for most requests), in transformers' order.

    `stop_ids` stand for transformers' EOS ids; `max_tokens` is the request's resolved
    output budget. The caller's own ``params.logits_processors`` run last, as
    transformers runs user processors after its own (and before the warpers).
    Raises InvalidArgumentError for token ids outside the vocabulary.
    """
    _check_token_ids(params, vocab_size)
    stop_ids = frozenset(stop_ids)
    processors = (_bias_processors(params, num_prompt_tokens, vocab_size, stop_ids)
                  + _position_processors(params, num_prompt_tokens, stop_ids, max_tokens))
    return [p for p in processors if p is not None] + list(params.logits_processors)
