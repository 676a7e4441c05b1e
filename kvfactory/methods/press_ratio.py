"""kvpress's budget convention: ``compression_ratio`` is the fraction of the prompt *removed*.

kvfactory's own budgets (``max_capacity_prompt``, ``max_capacity_prompt_ratio``) count what is *kept*. The methods
named after kvpress presses (``knorm``, ``lagkv``) take ``compression_ratio`` as kvpress does, and also accept
kvfactory's budgets; the two are never mixed in one method instance.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.methods.base import BudgetedCompressor


def kvpress_kept(seq_len: int, compression_ratio: float) -> int:
    """Tokens kvpress's ``ScorerPress`` keeps of ``seq_len`` at ``compression_ratio``: ``max(1, int(n · (1 − r)))``
    (truncated, not rounded)."""
    return max(1, int(seq_len * (1 - compression_ratio)))


@dataclass(kw_only=True)
class PressRatio(BudgetedCompressor):
    """A budget given as kvpress's ``compression_ratio`` (fraction removed, default 0.5) unless a kvfactory budget
    (``max_capacity_prompt`` or ``max_capacity_prompt_ratio``, fraction kept) is given instead.

    Parameters
    ----------
    compression_ratio:
        Fraction of the prompt removed, in ``[0, 1)``. ``None`` (the default) means 0.5 when no kvfactory budget is
        given, and "use the kvfactory budget" otherwise. Giving both is an error.
    """

    compression_ratio: float | None = None

    def __post_init__(self) -> None:
        kvfactory_budget = self.max_capacity_prompt is not None or self.max_capacity_prompt_ratio is not None
        if self.compression_ratio is not None and kvfactory_budget:
            raise ValueError(
                f"{self.name}: give compression_ratio (kvpress: the fraction removed) or max_capacity_prompt / "
                "max_capacity_prompt_ratio (kvfactory: what is kept), not both")
        if self.compression_ratio is None and not kvfactory_budget:
            self.compression_ratio = 0.5
        if self.compression_ratio is not None and not 0 <= self.compression_ratio < 1:
            raise ValueError(f"{self.name}: compression_ratio (fraction removed) must be in [0, 1), "
                             f"got {self.compression_ratio!r}")
        super().__post_init__()
        if self.compression_ratio is not None:
            self.max_capacity_prompt = None  # the budget is the ratio (BudgetedCompressor filled in its default)

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if budget is None and self.compression_ratio is not None:
            budget = max(kvpress_kept(seq_len, self.compression_ratio), self.min_capacity())
        return super().capacity(layer_idx, num_layers, seq_len, budget)
