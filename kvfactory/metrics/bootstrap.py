"""Paired bootstrap confidence intervals for comparing two methods on the same samples (Efron & Tibshirani 1993,
"An Introduction to the Bootstrap", ch. 13: percentile intervals). With the few samples a CPU campaign affords, a
difference is claimed only when its interval excludes zero."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over the paired samples and its percentile bootstrap interval at ``level``."""

    mean: float
    low: float
    high: float
    samples: int
    level: float

    @property
    def resolved(self) -> str:
        """``">"`` when the interval lies above zero, ``"<"`` below it, ``"≈"`` when it contains zero (no difference
        resolved)."""
        if self.low > 0:
            return ">"
        if self.high < 0:
            return "<"
        return "≈"

    def text(self, scale: float = 1.0, digits: int = 2) -> str:
        return (f"{self.mean * scale:+.{digits}f} [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"
                f" (n={self.samples})")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Resample the sample indices with replacement ``resamples`` times; the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled mean differences. ``a[i]`` and ``b[i]`` must score the same
    sample."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same samples: got {len(a)} and {len(b)} scores")
    if not a:
        raise ValueError("paired_bootstrap needs at least one paired sample")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[indices].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(float(differences.mean()), float(low), float(high), len(differences), level)
