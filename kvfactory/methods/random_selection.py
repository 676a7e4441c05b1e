"""Random: a baseline that keeps uniformly random tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import WindowedCompressor


@dataclass(kw_only=True)
class RandomSelection(WindowedCompressor):
    """Keeps ``C - W`` uniformly random past tokens plus the last ``W``: the floor any method must beat.

    Parameters
    ----------
    seed:
        Seeds a private generator per (layer, call), so runs are reproducible and the global RNG is untouched.
    (others):
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "random"
    seed: int = 0
    scores_are_attention_mass = False

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        batch, heads, n, _ = keys.shape
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + layer_idx * 7919 + n)
        return torch.rand(batch, heads, n - self.window_size, generator=generator).to(keys.device)
