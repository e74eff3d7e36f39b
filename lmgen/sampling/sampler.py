"""The batched sampler: a pure function of logits and per-request settings.

Warpers follow transformers' definitions and order (temperature, top-h, top-k, top-p,
min-p, typical-p, epsilon, eta), vectorised over rows that each carry their own values;
a warper that no row of the batch uses costs nothing. Every request draws from its own
``torch.Generator``, so a seeded request gets the same tokens whatever else shares its
batch.

A request that drafted tokens (speculative decoding) brings a row after each draft too,
processed as if the drafts before it were accepted; the sampler verifies its drafts
against those rows' distributions (:func:`accept_greedy`, :func:`accept_sampled`), so
its tokens follow exactly the distribution they would follow without drafts.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from lmgen.outputs import Logprob
from lmgen.params import SamplingParams

NEG_INF = float("-inf")


def apply_top_h(logits: torch.Tensor, top_h: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens (at most 100) while their entropy stays within top_h x the entropy of those 100."""
    top_logits, top_ids = logits.topk(min(100, logits.shape[-1]), dim=-1)
    top = torch.distributions.Categorical(logits=top_logits)
    entropy_terms = -top.probs * top.probs.log()
    keep_top = entropy_terms.cumsum(dim=-1) <= (top.entropy() * top_h)[:, None]
    keep_top[:, 0] = True
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_ids, keep_top)
    return logits.masked_fill(~keep & (top_h > 0)[:, None], NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keep tokens scoring at least the k-th best score (ties kept, as transformers does); max_k = max(top_k)."""
    k = top_k.clamp(min=1, max=logits.shape[-1])
    best = logits.topk(min(max_k, logits.shape[-1]), dim=-1).values
    threshold = best.gather(-1, (k - 1)[:, None])
    return logits.masked_fill((logits < threshold) & (top_k > 0)[:, None], NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p_tail: torch.Tensor) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose cumulative probability is <= 1 - top_p (the "tail").

    transformers' computation (softmax and cumsum of the ascending sorted logits), but only
    the sorted values are needed: tokens below the smallest kept value go, so no sort
    order is kept or scattered back. Tokens tied with that value all stay, where
    transformers keeps whichever its unstable sort put last.
    """
    ascending = _sorted_values(logits)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # non-decreasing: the removed ones lead
    removed = (cumulative <= top_p_tail[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)  # keep the best
    removed = torch.where(top_p_tail > 0, removed, 0)
    smallest_kept = ascending.gather(-1, removed[:, None])
    return logits.masked_fill(logits < smallest_kept, NEG_INF)


def _sorted_values(logits: torch.Tensor) -> torch.Tensor:
    """Each row's values in ascending order. On a CPU numpy's SIMD sort takes 0.4 ms for a
    49k-token row where torch.sort, which also sorts indices, takes 4.5 ms."""
    if logits.device.type == "cpu":
        return torch.from_numpy(np.sort(logits.numpy(), axis=-1))
    return logits.sort(dim=-1).values


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill((probs < threshold) & (min_p > 0)[:, None], NEG_INF)


def apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Typical sampling: keep the tokens whose surprise is closest to the entropy, up to typical_p of the mass."""
    log_probs = logits.log_softmax(dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance, order = (-log_probs - entropy).abs().sort(dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < typical_p[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    remove_sorted = distance > distance.gather(-1, last[:, None])
    remove_sorted[:, 0] = False  # keep at least the most typical token
    remove_sorted &= (typical_p < 1)[:, None]
    return logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), NEG_INF)


def apply_epsilon(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """Epsilon sampling: drop tokens less likely than epsilon (never the most likely one)."""
    return _drop_below(logits, logits.softmax(dim=-1), epsilon[:, None], epsilon > 0)


def apply_eta(logits: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Eta sampling: drop tokens less likely than min(eta, sqrt(eta) * exp(-entropy))."""
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    cutoff = torch.min(eta, eta.sqrt() * (-entropy).exp())
    return _drop_below(logits, logits.softmax(dim=-1), cutoff[:, None], eta > 0)


def _drop_below(logits: torch.Tensor, probs: torch.Tensor, cutoff: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    remove = (probs < cutoff) & (logits < logits.amax(dim=-1, keepdim=True)) & active[:, None]
    return logits.masked_fill(remove, NEG_INF)


@dataclass(frozen=True)
class Warpers:
    """The sampled rows' warper settings as [S] tensors; None where no row uses that warper."""

    temperature: torch.Tensor
    top_h: torch.Tensor | None = None  # 0 = off
    top_k: torch.Tensor | None = None  # long; 0 = off
    max_top_k: int = 0  # known on the host, so top-k needs no device sync
    top_p_tail: torch.Tensor | None = None  # 1 - top_p, computed in float64 as transformers does; 0 = off
    min_p: torch.Tensor | None = None  # 0 = off
    typical_p: torch.Tensor | None = None  # 1 = off
    epsilon: torch.Tensor | None = None  # 0 = off
    eta: torch.Tensor | None = None  # 0 = off

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> "Warpers":
        def column(values: list, off: float, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            return None if all(v == off for v in values) else torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=torch.tensor([p.temperature for p in params], device=device),
            top_h=column([p.top_h or 0.0 for p in params], 0.0),
            top_k=column([p.top_k for p in params], 0, torch.long),
            max_top_k=max(p.top_k for p in params),
            top_p_tail=column([1.0 - p.top_p for p in params], 0.0),
            min_p=column([p.min_p for p in params], 0.0),
            typical_p=column([p.typical_p for p in params], 1.0),
            epsilon=column([p.epsilon_cutoff for p in params], 0.0),
            eta=column([p.eta_cutoff for p in params], 0.0),
        )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [S, vocab] -> warped scores, in transformers' order."""
        scores = logits / self.temperature[:, None]
        steps: list[tuple[Callable, torch.Tensor | None]] = [
            (apply_top_h, self.top_h), (partial(apply_top_k, max_k=self.max_top_k), self.top_k),
            (apply_top_p, self.top_p_tail), (apply_min_p, self.min_p), (apply_typical_p, self.typical_p),
            (apply_epsilon, self.epsilon), (apply_eta, self.eta)]
        for warp, setting in steps:
            if setting is not None:
                scores = warp(scores, setting)
        return scores


def row_starts(drafts: list[list[int]]) -> list[int]:
    """Each request's first logits row, where request i has 1 + len(drafts[i]) rows: its next token's and
    (speculative decoding) the one after each of its drafts."""
    return list(itertools.accumulate([0, *(1 + len(d) for d in drafts[:-1])]))


@dataclass(frozen=True)
class SamplingBatch:
    """Per-request settings. Request i owns ``1 + len(drafts[i])`` consecutive rows of the logits: its
    next token's and, when it drafted (speculative decoding), the one after each of its drafts."""

    starts: list[int]  # each request's first row
    drafts: list[list[int]]
    draft_probs: list[torch.Tensor | None]  # [len(drafts), vocab]: what the drafts were drawn from; None: chosen
    sampling: list[bool]  # temperature > 0; the others take the argmax
    sampled_rows: list[int]  # the rows of the sampling requests
    warpers: Warpers | None  # settings of the sampled rows, in their order
    generators: list[torch.Generator]
    num_logprobs: list[int | None]
    keep_scores: bool = False  # some request records its processed scores: write the warped rows back
    renormalized_rows: list[int] = field(default_factory=list)  # rows of recorded requests that renormalize_logits

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator], device: torch.device,
              drafts: list[list[int]] | None = None, draft_probs: list[torch.Tensor | None] | None = None,
              ) -> "SamplingBatch":
        drafts = drafts if drafts is not None else [[] for _ in params]
        starts = row_starts(drafts)
        rows = [range(start, start + 1 + len(d)) for start, d in zip(starts, drafts)]
        sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        return cls(
            starts=starts, drafts=drafts, draft_probs=draft_probs or [None] * len(params),
            sampling=[p.temperature > 0 for p in params],
            sampled_rows=[row for i in sampled for row in rows[i]],
            warpers=Warpers.build([params[i] for i in sampled for _ in rows[i]], device) if sampled else None,
            generators=generators,
            num_logprobs=[p.logprobs for p in params],
            keep_scores=any(p.score_recorder is not None and p.score_recorder.keep_scores for p in params),
            renormalized_rows=[row for i, p in enumerate(params) if p.renormalize_logits and p.score_recorder
                               for row in rows[i]],
        )


class ScoreRecorder:
    """Keeps a request's per-step rows for transformers' ``output_scores`` and ``output_logits``.

    ``scores`` are what the token was chosen from (after the processors and, when
    sampling, the warpers; log-softmaxed with ``renormalize_logits``, transformers'
    last processor); ``logits`` are the model's raw logits. One
    recorder serves all n completions of a request: rows are kept per completion index.
    """

    def __init__(self, scores: bool = False, logits: bool = False) -> None:
        self.keep_scores, self.keep_logits = scores, logits
        self.scores: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.logits: dict[int, list[torch.Tensor]] = defaultdict(list)

    def add(self, index: int, raw: torch.Tensor, processed: torch.Tensor) -> None:
        """One step of completion `index`: raw and processed rows [vocab] (copied, not kept as views)."""
        if self.keep_logits:
            self.logits[index].append(raw.clone())
        if self.keep_scores:
            self.scores[index].append(processed.clone())


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's highest-scoring token: the first one on ties, and the first NaN where there is one,
    as ``torch.argmax`` chooses.

    CPU float32 rows go through numpy's argmax, which is vectorised where PyTorch's CPU one is not:
    4 vs 85 us for a row of 32000 logits, 53 vs 590 us for 16 rows (2-core AVX2), in every greedy step.
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse transform: the first token whose cumulative probability
    exceeds u times the row's total, u ~ U[0, 1) from the row's own generator.

    One random number per row: an exponential per token (argmax(p / E), the other exact
    way) cost 1.2-2 ms per 49k-token row on a CPU, ~90 ms a step at batch 64; this costs
    0.1 and 2. PyTorch's CPU cumsum adds in float64 and rounds each sum once, so the
    boundaries are exact to float32 precision; u's largest value (1 - 2^-24) times the
    total stays below the total, and a token of zero probability has an empty interval,
    so the search always lands on a token that has probability.
    """
    cumulative = probs.cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(cumulative)
    targets = uniform[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, targets, right=True).squeeze(-1)


def top_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num: list[int | None]) -> list[dict[int, Logprob] | None]:
    """For rows that asked (`num` not None): the token's logprob and rank (1 + how many are likelier), and the
    top-n alternatives. One pass over all asking rows (a prompt scores hundreds at once)."""
    results: list[dict[int, Logprob] | None] = [None] * len(num)
    rows = [row for row, n in enumerate(num) if n is not None]
    if not rows:
        return results
    tokens = tokens.to(logprobs.device)
    if len(rows) < len(num):
        index = torch.tensor(rows, device=logprobs.device)
        logprobs, tokens = logprobs[index], tokens[index]
    chosen = logprobs.gather(-1, tokens[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    top = logprobs.topk(min(max(num[row] for row in rows), logprobs.shape[-1]), dim=-1)
    values, ids = top.values.tolist(), top.indices.tolist()
    for i, (row, token, value) in enumerate(zip(rows, tokens.tolist(), chosen.squeeze(-1).tolist())):
        entry = {token: Logprob(value, ranks[i])}
        for rank, (alternative, tid) in enumerate(zip(values[i][:num[row]], ids[i][:num[row]]), 1):
            entry.setdefault(tid, Logprob(alternative, rank))
        results[row] = entry
    return results


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """Greedy verification: the drafts the target agrees with, then the target's own next token
    (targets[i] is the target's choice after the sequence and drafts[:i]; len(targets) == len(drafts) + 1)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return drafts[:accepted] + [targets[accepted]]


def accept_sampled(probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator) -> list[int]:
    """Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): the accepted drafts, then one drawn token.

    probs [k + 1, vocab] are the target's distributions after the sequence and after each of the k
    drafts; draft_probs [k, vocab] the distributions q the drafts were drawn from (None: the drafts were
    chosen, not drawn, so q is one-hot). Draft i is accepted with probability min(1, p(x) / q(x)); the
    first rejected one is replaced by a draw from max(p - q, 0) renormalised (for a one-hot q: p without
    x), and after k accepted drafts one more token is drawn from probs[k]. Each returned token is thus
    distributed exactly as the target's next token given the ones before it. The draws come from
    `generator` (k uniforms, then one for the last token), so a seeded request repeats itself.
    """
    k = len(drafts)
    ids = torch.tensor(drafts, dtype=torch.long, device=probs.device)[:, None]
    p = probs[:k].gather(-1, ids).squeeze(-1)
    q = (torch.ones_like(p) if draft_probs is None
         else draft_probs[:k].to(probs.device, probs.dtype).gather(-1, ids).squeeze(-1))
    uniform = torch.rand(k, generator=generator, device=generator.device).to(p)
    rejected = (uniform * q >= p).nonzero()  # u < p / q accepts; q = 0 < p too, p = 0 never
    accepted = int(rejected[0]) if len(rejected) else k
    last = probs[accepted]
    if accepted < k:
        if draft_probs is None:
            residual = last.index_fill(0, ids[accepted], 0.0)
        else:
            residual = (last - draft_probs[accepted].to(last)).clamp(min=0)
        last = torch.where(residual.sum() > 0, residual, last)  # p == q up to rounding: nothing is left over
    return drafts[:accepted] + _draw(last[None], [generator]).tolist()


def _choose(batch: SamplingBatch, greedy: list[int], probs: torch.Tensor | None) -> list[list[int]]:
    """Each request's tokens: the argmax, or a draw from `probs` (the sampled rows' warped distributions), after
    verifying its drafts, if any. Sampling requests that did not draft are drawn together."""
    chosen: list[list[int]] = []
    undrafted, row = [], 0  # row: the request's first row in probs
    for i, (start, drafts) in enumerate(zip(batch.starts, batch.drafts)):
        if not batch.sampling[i]:
            chosen.append(accept_greedy(drafts, greedy[start:start + len(drafts) + 1]))
            continue
        if drafts:
            chosen.append(accept_sampled(probs[row:row + len(drafts) + 1], drafts, batch.draft_probs[i],
                                         batch.generators[i]))
        else:
            undrafted.append((i, row))
            chosen.append([])
        row += len(drafts) + 1
    if undrafted:
        rows = [row for _, row in undrafted]
        drawn = _draw(probs if len(rows) == len(probs) else probs[rows], [batch.generators[i] for i, _ in undrafted])
        for (i, _), token in zip(undrafted, drawn.tolist()):
            chosen[i] = [token]
    return chosen


def sample(logits: torch.Tensor, batch: SamplingBatch,
           ) -> tuple[list[list[int]], list[list[dict[int, Logprob]] | None], torch.Tensor]:
    """logits [rows, vocab] float32 (already processed per row) -> (each request's tokens, their logprobs,
    scores). A request that drafted gets its accepted drafts and one token more, the others one token.

    Logprobs (one entry per token) are those of the distribution before temperature and warpers.
    ``scores`` is ``logits`` itself; when ``batch.keep_scores``, its sampled rows are overwritten
    with their warped values, so it holds what each token was chosen from (log-softmaxed
    for rows with ``renormalize_logits``, which changes no choice).
    """
    logprobs = logits.log_softmax(dim=-1) if any(n is not None for n in batch.num_logprobs) else None
    probs = None
    if batch.sampled_rows:
        rows = (slice(None) if len(batch.sampled_rows) == len(logits)  # a view: no gather, no scatter
                else torch.tensor(batch.sampled_rows, device=logits.device))
        warped = batch.warpers(logits[rows])
        probs = warped.softmax(dim=-1)
        if batch.keep_scores:
            logits[rows] = warped
    chosen = _choose(batch, greedy_tokens(logits).tolist(), probs)
    for row in batch.renormalized_rows:
        logits[row] = logits[row].log_softmax(dim=-1)
    if logprobs is None:
        return chosen, [None] * len(chosen), logits
    return chosen, _chosen_logprobs(logprobs, batch, chosen), logits


def _chosen_logprobs(logprobs: torch.Tensor, batch: SamplingBatch, chosen: list[list[int]],
                     ) -> list[list[dict[int, Logprob]] | None]:
    """The logprob entries of each chosen token (at the row it was chosen at), per request that asked."""
    rows = [start + j for start, tokens in zip(batch.starts, chosen) for j in range(len(tokens))]
    entries = iter(top_logprobs(logprobs if len(rows) == len(logprobs) else logprobs[rows],
                                torch.tensor([t for tokens in chosen for t in tokens]),
                                [n for n, tokens in zip(batch.num_logprobs, chosen) for _ in tokens]))
    per_request = [[next(entries) for _ in tokens] for tokens in chosen]
    return [None if n is None else lps for n, lps in zip(batch.num_logprobs, per_request)]
