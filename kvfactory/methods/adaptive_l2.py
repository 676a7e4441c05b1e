"""Adaptive L2: no compression up to a soft limit, progressive compression up to a hard limit, then a target size."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvfactory.methods.l2norm import L2Norm


def adaptive_size(seq_len: int, target: int, soft: int, hard: int) -> int:
    """Tokens kept of ``seq_len``: all up to ``soft``; then a kept share falling linearly from 1 at ``soft`` to
    ``target / hard`` at ``hard``; ``target`` beyond ``hard``."""
    if seq_len <= soft:
        return seq_len
    if seq_len > hard:
        return min(target, seq_len)
    progress = (seq_len - soft) / (hard - soft)
    return min(seq_len, max(target, round(seq_len * (1 - progress * (1 - target / hard)))))


@dataclass(kw_only=True)
class AdaptiveL2(L2Norm):
    """kvcompress's ``adaptive_l2``: the L2 method (Devoto et al. 2024, arXiv:2406.11430, lowest key norms kept) with a
    budget that adapts to the length ``n``: nothing is evicted while ``n ≤ soft_limit``; between the limits the kept
    share falls linearly from 1 to ``target_size / hard_limit`` (never below ``target_size``); beyond ``hard_limit``
    the cache is cut to ``target_size``.

    Parameters
    ----------
    max_capacity_prompt:
        kvcompress's ``target_size`` (default 512).
    soft_limit:
        Length up to which nothing is evicted (default ``None``: ``target_size``).
    hard_limit:
        Length from which the cache is ``target_size`` (default ``None``: ``2 · target_size``).
    skip_layers:
        Layers left uncompressed (default ``[]``).
    window_size, decode_budget, compress_interval:
        See :class:`~kvfactory.methods.l2norm.L2Norm` (with ``decode_budget`` the target while decoding is that).
    """

    name = "adaptive_l2"
    soft_limit: int | None = None
    hard_limit: int | None = None
    skip_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_capacity_prompt is None:
            raise ValueError("adaptive_l2: give max_capacity_prompt (the target_size), not max_capacity_prompt_ratio")
        soft, hard = self.limits(self.max_capacity_prompt)
        if not self.max_capacity_prompt <= soft < hard:
            raise ValueError(f"adaptive_l2: need target_size (max_capacity_prompt={self.max_capacity_prompt}) <= "
                             f"soft_limit ({soft}) < hard_limit ({hard})")

    def limits(self, target: int) -> tuple[int, int]:
        """``(soft_limit, hard_limit)`` for ``target``."""
        soft = target if self.soft_limit is None else self.soft_limit
        hard = 2 * target if self.hard_limit is None else self.hard_limit
        return soft, hard

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if layer_idx in self.skip_layers:
            return seq_len
        target = budget if budget is not None else self.max_capacity_prompt
        assert target is not None
        soft, hard = self.limits(target)
        return max(adaptive_size(seq_len, target, max(soft, target), max(hard, target + 1)), self.min_capacity())
