"""AdaKV: one budget per layer, shared by its heads according to their attention concentration."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.headwise import HeadwiseCompressor
from kvfactory.methods.pyramidkv import pyramid_capacity


def adakv_winners(past_scores: torch.Tensor, budget: int, normalize: bool) -> torch.Tensor:
    """AdaKV's competition: of the layer's top ``Hkv · budget`` past scores (each head's sorted scores scaled, with
    ``normalize``, by the share of its finite mass in its top ``budget``), how many each head wins, ``(B, Hkv)``."""
    batch, heads, past = past_scores.shape
    ranked = past_scores.sort(dim=-1, descending=True).values
    if normalize:
        finite = torch.where(torch.isfinite(ranked), ranked, torch.zeros_like(ranked))
        ranked = ranked * (finite[..., :budget].sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp_min(1e-30))
    winners = ranked.reshape(batch, heads * past).topk(heads * budget, dim=-1).indices // past
    won = torch.zeros(batch, heads, dtype=torch.long, device=past_scores.device)
    won.scatter_add_(1, winners, torch.ones_like(winners))
    return won


@dataclass(kw_only=True)
class AdaKV(HeadwiseCompressor):
    """Adaptive head-wise budgets (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation for Efficient LLM Inference", arXiv:2407.11550), as KVCache-Factory's ``AdaKVCluster`` (kv_head mode).

    Scores: mean window attention, reduced over the query group, pooled. With ``B = C − W`` past tokens per head and
    ``F = int(B · floor_ratio)``: each head's scores are sorted (and, with ``normalize``, scaled by the share of its
    mass in its top ``B``); the top ``Hkv · B`` scores of the whole layer are picked; head ``h`` wins ``n_h`` of them
    and keeps ``round(n_h · (1 − floor_ratio) + F)`` past tokens plus the window. The layer keeps ``≈ Hkv · C``
    tokens (± one per head from rounding), like SnapKV, distributed unevenly, in real ragged storage.

    Parameters
    ----------
    floor_ratio:
        Share of each head's budget it keeps whatever its scores (default 0.2).
    normalize:
        Scale each head's scores by its top-``B`` share before pooling across heads (default True, as KVCF).
    (others):
        As :class:`~kvfactory.methods.snapkv.SnapKV` (W=8, kernel 7, maxpool, gqa_score_agg mean), without merge.
    """

    name = "adakv"
    floor_ratio: float = 0.2
    normalize: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.floor_ratio <= 1:
            raise ValueError(f"{self.name}: floor_ratio must be in [0, 1], got {self.floor_ratio!r}")
        super().__post_init__()

    def head_caps(self, past_scores: torch.Tensor, capacity: int, layer_idx: int, num_layers: int,
                  num_query_heads: int) -> torch.Tensor:
        budget = capacity - self.window_size
        won = adakv_winners(past_scores, budget, self.normalize)
        return torch.round(won * (1 - self.floor_ratio) + int(budget * self.floor_ratio)).long()


@dataclass(kw_only=True)
class AdaPyramidKV(AdaKV):
    """AdaKV's head-wise allocation under PyramidKV's per-layer budget (Ada-PyramidKV in the AdaKV paper).

    Parameters
    ----------
    beta:
        PyramidKV's steepness (default 20).
    (others):
        As :class:`AdaKV`.
    """

    name = "ada-pyramidkv"
    beta: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.beta, int) or self.beta < 1:
            raise ValueError(f"ada-pyramidkv: beta must be a positive integer, got {self.beta!r}")
        super().__post_init__()

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        total = super().capacity(layer_idx, num_layers, seq_len, budget)
        return pyramid_capacity(total, self.window_size, self.beta, layer_idx, num_layers, seq_len)
