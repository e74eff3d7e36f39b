"""The sampler draws from the distribution transformers' warpers define.

For each setting, many seeded draws from one fixed distribution are checked against
softmax(transformers-warped logits): no draw outside the kept tokens, and a chi-square
statistic under a bound that a correct sampler stays below (the seed is fixed, so the
test cannot flake). The same draws must reject the distributions that keep one token
more or one fewer, which shows the test would catch, say, top_p off by one token.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmgen import SamplingParams
from lmgen.sampling.sampler import SamplingBatch, greedy_tokens, sample
from transformers_reference import transformers_processors

LOGITS = torch.tensor([3.0, 2.6, 2.2, 2.0, 1.5, 1.0, 0.4, 0.0, -0.5, -1.5, -3.0, -6.0])
NUM_DRAWS = 40_000

SETTINGS = {  # SamplingParams fields, named as in transformers
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.2),
    "typical_p": dict(typical_p=0.7),
    "epsilon_cutoff": dict(epsilon_cutoff=0.03),
    "eta_cutoff": dict(eta_cutoff=0.05),
    "top_h": dict(top_h=0.7),
    "temperature+top_k+top_p": dict(temperature=1.3, top_k=6, top_p=0.9),
    "min_p+typical_p": dict(temperature=0.9, min_p=0.05, typical_p=0.9),
    "all of them": dict(temperature=1.1, top_h=0.95, top_k=9, top_p=0.95, min_p=0.02, typical_p=0.97,
                        epsilon_cutoff=0.005, eta_cutoff=0.005),
}


def expected_distribution(settings: dict) -> torch.Tensor:
    warped = transformers_processors(dict(do_sample=True, top_k=0) | settings, 1)(torch.tensor([[1]]), LOGITS[None])
    return warped[0].softmax(dim=-1)


def draw_counts(settings: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    params = [SamplingParams(**settings)] * NUM_DRAWS
    batch = SamplingBatch.build(params, [generator] * NUM_DRAWS, torch.device("cpu"))
    tokens, _, _ = sample(LOGITS.expand(NUM_DRAWS, -1).clone(), batch)
    return torch.bincount(torch.tensor(tokens).flatten(), minlength=len(LOGITS)).double()


def fits(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """No draw where probs is 0, and a chi-square statistic far below what a wrong distribution gives."""
    support = probs > 0
    if counts[~support].sum() > 0:
        return False
    expected = probs[support].double() * NUM_DRAWS
    chi_square = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    return chi_square <= dof + 6 * math.sqrt(2 * max(dof, 1)) + 6  # ~ 1e-6 false-alarm rate for any seed


def one_token_more_or_fewer(probs: torch.Tensor, least: float = 0.01) -> list[torch.Tensor]:
    """The distributions a sampler off by one token would draw from (where that token has some weight)."""
    alternatives = []
    kept = (probs > 0).nonzero().flatten()
    boundary = kept[probs[kept].argmin()]
    if len(kept) > 1 and probs[boundary] >= least:
        fewer = probs.clone()
        fewer[boundary] = 0
        alternatives.append(fewer / fewer.sum())
    full = LOGITS.softmax(dim=-1)
    dropped = (probs == 0).nonzero().flatten()
    if len(dropped) and full[dropped[0]] >= least:
        more = probs * (1 - full[dropped[0]])
        more[dropped[0]] = full[dropped[0]]
        alternatives.append(more)
    return alternatives


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_frequencies_match_the_warped_distribution(name):
    probs = expected_distribution(SETTINGS[name])
    counts = draw_counts(SETTINGS[name])
    assert fits(counts, probs), f"{name}: counts {counts.tolist()} vs probabilities {probs.tolist()}"
    alternatives = one_token_more_or_fewer(probs)
    assert alternatives or name == "temperature", f"{name}: choose settings whose boundary tokens matter"
    for wrong in alternatives:
        assert not fits(counts, wrong), f"{name}: the test cannot tell {wrong.tolist()} apart"


def test_greedy_tokens_choose_as_torch_argmax_does():
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, 5.0, 5.0, 2.0], [1.0, nan, 3.0, nan], [-inf, -inf, -inf, -inf], [inf, 0.0, inf, nan]])
    wide = torch.randn(5, 32000)
    for logits in (rows, wide, wide[:, ::3], wide.T, rows.bfloat16()):  # ties, NaNs, strided, half precision
        tokens = greedy_tokens(logits)
        assert tokens.dtype == torch.int64 and torch.equal(tokens, logits.argmax(dim=-1))
