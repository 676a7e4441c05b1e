"""LagKV: lag-relative min/max statistics of each partition against the next one."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import Selection
from kvfactory.methods.press_ratio import PressRatio


def lag_scores(states: torch.Tensor, sinks: int, lag: int) -> torch.Tensor:
    """LagKV's score ``(B, H, n)`` of keys or values ``states (B, H, n, d)``; sinks and the last (incomplete) partitions
    are not scored here (the caller keeps them).

    The tokens after the sinks are cut into partitions of ``lag``; each full partition but the last is normalized
    channel-wise by the min and max of the *next* partition, and a token's score is the standard deviation of its
    normalized channels, soft-maxed within its partition. Returns ``(B, H, P - 1, lag)`` for ``P`` full partitions.
    """
    batch, heads, n, dim = states.shape
    partitions = (n - sinks) // lag
    chunks = states[:, :, sinks : sinks + partitions * lag].float().reshape(batch, heads, partitions, lag, dim)
    reference = chunks[:, :, 1:]
    low, high = reference.amin(dim=-2, keepdim=True), reference.amax(dim=-2, keepdim=True)
    normalized = (chunks[:, :, :-1] - low) / (high - low)
    return normalized.std(dim=-1).softmax(dim=-1)


@dataclass(kw_only=True)
class LagKV(PressRatio):
    """LagKV (Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
    arXiv:2504.04704), as kvpress's ``LagKVPress``.

    Past the ``n_sink`` sinks, the prompt is cut into partitions of ``lag_size`` tokens. Every full partition that has
    a full partition after it is scored against that next one: keys and values are min/max-normalized per channel by
    the next partition's range, the per-token standard deviation over channels is soft-maxed within the partition,
    and the key and value scores are averaged. Within each partition a token's final score is its rank divided by
    ``lag_size`` (in ``[0, 1)``); the sinks and the tail (the last full partition plus the remainder) score 1 and are
    kept first. A prompt shorter than ``n_sink + 2 · lag_size`` is scored by recency (sinks, then the most recent).
    The top ``capacity`` tokens are kept (kvpress's ``ScorerPress``: ``max(1, int(n · (1 − compression_ratio)))``).

    Parameters
    ----------
    compression_ratio:
        Fraction removed (kvpress's convention), default 0.5 when no kvfactory budget is given.
    max_capacity_prompt, max_capacity_prompt_ratio:
        kvfactory's budgets (kept) instead.
    n_sink:
        Initial tokens always kept (default 4).
    lag_size:
        Partition length (default 128).
    decode_budget, compress_interval:
        See :class:`~kvfactory.methods.base.BudgetedCompressor`.
    """

    name = "lagkv"
    n_sink: int = 4
    lag_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"lagkv: n_sink must be a non-negative integer, got {self.n_sink!r}")
        if not isinstance(self.lag_size, int) or self.lag_size < 1:
            raise ValueError(f"lagkv: lag_size must be a positive integer, got {self.lag_size!r}")
        super().__post_init__()

    def scores(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """LagKV's score ``(B, Hkv, n)`` of every token (higher kept)."""
        batch, heads, n, _ = keys.shape
        scores = torch.ones(batch, heads, n, device=keys.device)
        if n < self.n_sink + 2 * self.lag_size:
            if n > self.n_sink:
                recent = n - self.n_sink
                scores[..., self.n_sink :] = torch.arange(recent, device=keys.device) / recent
            return scores
        partition = (lag_scores(keys, self.n_sink, self.lag_size) + lag_scores(values, self.n_sink, self.lag_size)) / 2
        ranks = partition.argsort(dim=-1).argsort(dim=-1).float() / self.lag_size
        scored = ranks.shape[2] * self.lag_size
        scores[..., self.n_sink : self.n_sink + scored] = ranks.flatten(2)
        return scores

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        indices = self.scores(keys, values).topk(capacity, dim=-1).indices.sort(dim=-1).values
        return Selection(indices)
