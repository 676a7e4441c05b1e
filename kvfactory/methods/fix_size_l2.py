"""Fix-size L2: a fixed-size cache, recent tokens protected, the older ones chosen by key norm (kvcompress)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvfactory.methods.base import BudgetedCompressor, Selection, top_past_plus_window

STRATEGIES = ("keep_low", "keep_high", "random")


@dataclass(kw_only=True)
class FixSizeL2(BudgetedCompressor):
    """kvcompress's ``fix_size_l2`` (after Devoto et al. 2024, arXiv:2406.11430): at most ``C`` tokens; the most recent
    ``int(C · keep_ratio)`` are protected, and the rest of the budget is filled from the older tokens by ``strategy``:
    ``keep_low`` (lowest key norms, the L2 method), ``keep_high`` (highest norms) or ``random`` (seeded). Nothing is
    evicted while the sequence fits in ``C``.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, kvcompress's ``fix_kv_size`` (default 512).
    keep_ratio:
        Share of ``C`` reserved for the most recent tokens (default 0.2), in ``[0, 1)``.
    strategy:
        ``keep_low`` (default), ``keep_high`` or ``random``.
    seed:
        Seed of the ``random`` strategy (default 0; offset by the layer).
    skip_layers:
        Layers left uncompressed (default ``[0, 1]``, as kvcompress).
    decode_budget, compress_interval:
        See :class:`~kvfactory.methods.base.BudgetedCompressor`.
    """

    name = "fix_size_l2"
    keep_ratio: float = 0.2
    strategy: str = "keep_low"
    seed: int = 0
    skip_layers: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self) -> None:
        if not 0 <= self.keep_ratio < 1:
            raise ValueError(f"fix_size_l2: keep_ratio must be in [0, 1), got {self.keep_ratio!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"fix_size_l2: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        super().__post_init__()

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if layer_idx in self.skip_layers:
            return seq_len
        return super().capacity(layer_idx, num_layers, seq_len, budget)

    def protected(self, capacity: int) -> int:
        """Recent tokens kept at ``capacity``."""
        return min(int(capacity * self.keep_ratio), capacity - 1)

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        window = self.protected(capacity)
        past = keys.shape[-2] - window
        norms = keys[..., :past, :].float().norm(dim=-1)
        if self.strategy == "keep_low":
            scores = -norms
        elif self.strategy == "keep_high":
            scores = norms
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_idx)
            scores = torch.rand(norms.shape, generator=generator).to(norms.device)
        return Selection(top_past_plus_window(scores, capacity, window))
