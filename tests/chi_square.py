"""Statistical helpers for tests that compare samplers with exact distributions."""

from __future__ import annotations

import torch
from scipy import stats


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer counts (K,) to probs (K,); cells with expected count < 5 are
    pooled into one (the usual validity condition of the chi-square approximation)."""
    n = float(counts.sum())
    expected = probs.double() * n
    small = expected < 5
    obs = counts.double()[~small].tolist()
    exp = expected[~small].tolist()
    if small.any():
        obs.append(float(counts.double()[small].sum()))
        exp.append(float(expected[small].sum()))
    scale = sum(obs) / sum(exp)  # tiny float mismatch only; scipy wants equal sums
    return float(stats.chisquare(obs, [e * scale for e in exp]).pvalue)
