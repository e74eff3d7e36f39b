"""The sampler draws from the distribution transformers' warpers define.

For each setting, many seeded draws from one fixed distribution are checked against
softmax(transformers-warped logits): no draw outside the kept tokens, and a chi-square
statistic under a bound that a correct sampler stays below (the seed is fixed, so the
test cannot flake). The same draws must reject the distributions that keep one token
more or one fewer, which shows the test would catch, say, top_p off by one token.
Speculative decoding's rejection sampling is checked the same way: its tokens must follow
the target's distributions whatever the drafts.
"""

from __future__ import annotations

import pytest
import torch

from chi_square import fits
from lmgen import SamplingParams
from lmgen.sampling.sampler import SamplingBatch, accept_sampled, greedy_tokens, sample
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


# the target's distributions after a sequence, after a first draft and after a second one (speculative decoding);
# the first two leave out their least likely tokens
TARGETS = torch.stack([LOGITS.masked_fill(LOGITS < -1, float("-inf")), LOGITS.flip(0).masked_fill(LOGITS.flip(0) < -1,
                       float("-inf")), LOGITS.roll(5)]).softmax(-1)
NUM_VERIFIED = 10_000  # each a call of accept_sampled


def rejection_counts(drafts: torch.Tensor, draft_probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first token, and of the second where the first draft was accepted, over the drafts' rows."""
    generator = torch.Generator().manual_seed(1234)
    first, second = torch.zeros(len(LOGITS)), torch.zeros(len(LOGITS))
    for row in drafts.tolist():
        tokens = accept_sampled(TARGETS, row, draft_probs, generator)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    return first, second


def test_rejection_sampling_of_chosen_drafts_gives_the_target_distribution():
    """Prompt lookup's drafts are chosen (q one-hot): the most likely first draft, then one the target forbids."""
    forbidden = int(TARGETS[1].argmin())
    first, second = rejection_counts(torch.tensor([[0, forbidden]]).expand(NUM_VERIFIED, -1), None)
    assert TARGETS[1, forbidden] == 0 and second[forbidden] == 0
    assert fits(first, TARGETS[0]) and fits(second, TARGETS[1])
    assert second.sum() == first[0]  # the first draft accepted each time it came out
    # drawing from p itself, not p without the draft, after a rejection would give the draft too often
    naive = TARGETS[0] * (1 - TARGETS[0, 0])
    naive[0] += TARGETS[0, 0]
    assert not fits(first, naive)


def test_rejection_sampling_of_drawn_drafts_gives_the_target_distribution():
    """A draft model's drafts are drawn from its own distributions q, which differ from the target's."""
    generator = torch.Generator().manual_seed(99)
    draft_probs = torch.randn(2, len(LOGITS), generator=generator).mul(1.5).softmax(-1)
    drafts = torch.stack([torch.multinomial(q, NUM_VERIFIED, replacement=True, generator=generator)
                          for q in draft_probs], dim=1)
    first, second = rejection_counts(drafts, draft_probs)
    assert fits(first, TARGETS[0]) and fits(second, TARGETS[1]) and second.sum() > NUM_VERIFIED / 10
    assert not fits(first, draft_probs[0])  # the drafts' own distribution is told apart


def test_rejection_sampling_repeats_itself_with_a_seed():
    drafts, draft_probs = [3, 4], TARGETS[1:].flip(0)
    runs = [[accept_sampled(TARGETS, drafts, draft_probs, torch.Generator().manual_seed(seed)) for seed in range(50)]
            for _ in range(2)]
    assert runs[0] == runs[1] and len({tuple(tokens) for tokens in runs[0]}) > 5
