"""The chi-square check that sampled tokens follow a distribution (tests/sampling, speculative decoding's)."""

import math

import torch


def fits(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """No draw where probs is 0, and a chi-square statistic far below what a wrong distribution gives."""
    support = probs > 0
    if counts[~support].sum() > 0:
        return False
    expected = probs[support].double() * counts.sum()
    chi_square = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    return chi_square <= dof + 6 * math.sqrt(2 * max(dof, 1)) + 6  # ~ 1e-6 false-alarm rate for any seed
