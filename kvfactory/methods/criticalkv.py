"""CriticalKV: any scorer's scores weighted by the value projections' output norm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvfactory.methods.base import Selection
from kvfactory.methods.over_scorer import OverScorer


def output_projection(module: Any) -> torch.Tensor:
    """The output projection weight ``(hidden, Hq·d)`` of an attention module (``o_proj``, or GPT-NeoX's ``dense``)."""
    for name in ("o_proj", "dense"):
        layer = getattr(module, name, None)
        if layer is not None:
            return layer.weight
    raise ValueError(f"criticalkv: {type(module).__name__} has no o_proj or dense output projection")


@dataclass(kw_only=True)
class CriticalKV(OverScorer):
    """CriticalKV (Feng et al. 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
    Perspective", arXiv:2502.03805), as kvpress's ``CriticalKVPress``: a wrapper over any scorer.

    With the scorer's scores ``s`` (window at the top past score) and a budget ``C``: stage 1 keeps the top
    ``int(C · first_stage_ratio)`` tokens by ``s``; stage 2 fills the rest by ``(s + epsilon) · ‖W_o v‖₁``, where
    ``‖W_o v‖₁`` is the L1 norm of each value through its query heads' slices of the output projection, averaged over
    the KV head's query group. The last ``W`` tokens are always kept.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per layer and KV head (default 512).
    base:
        The scorer, any per-token method name (default ``"snapkv"``); ``base_kwargs`` its parameters (its
        ``window_size`` is this method's window).
    epsilon:
        Added to the scores before the norm weighting (default 1e-4).
    first_stage_ratio:
        Share of the budget chosen by the raw scores (default 0.5).
    decode_budget, compress_interval, max_capacity_prompt_ratio:
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "criticalkv"
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5
    scores_are_attention_mass = False

    def __post_init__(self) -> None:
        if not 0 <= self.first_stage_ratio <= 1:
            raise ValueError(f"criticalkv: first_stage_ratio must be in [0, 1], got {self.first_stage_ratio!r}")
        super().__post_init__()
        self.output_projections: list[torch.Tensor] | None = None

    def attach(self, handle: Any) -> None:
        super().attach(handle)
        self.output_projections = [output_projection(module) for module in handle.attention_modules]

    def projected_norm(self, values: torch.Tensor, num_query_heads: int, layer_idx: int) -> torch.Tensor:
        """``‖v W_oₕᵀ‖₁`` averaged over each KV head's query heads ``h``: ``(B, Hkv, n)`` fp32."""
        if self.output_projections is None:
            raise ValueError("criticalkv needs the model's output projections: run it through kvfactory.patch "
                             "(or set output_projections, one (hidden, Hq·d) weight per layer)")
        weight = self.output_projections[layer_idx].float()
        batch, heads, n, dim = values.shape
        groups = num_query_heads // heads
        norms = values.new_zeros(batch, heads, n, dtype=torch.float32)
        for head in range(num_query_heads):
            projected = values[:, head // groups].float() @ weight[:, head * dim : (head + 1) * dim].T
            norms[:, head // groups] += projected.abs().sum(dim=-1) / groups
        return norms

    def critical_scores(self, queries, keys, values, capacity: int, layer_idx: int) -> torch.Tensor:
        """Both stages as one score ``(B, Hkv, n)``: the tokens kept are its top ``capacity``."""
        scores = self.full_scores(queries, keys, values, layer_idx)
        weighted = (scores + self.epsilon) * self.projected_norm(values, queries.shape[1], layer_idx)
        first = int(capacity * self.first_stage_ratio)
        if first:
            weighted.scatter_(-1, scores.topk(min(first, scores.shape[-1]), dim=-1).indices, float("inf"))
        if self.window_size:
            weighted[..., -self.window_size :] = float("inf")
        return weighted

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        capacity = self.capacity(layer_idx, 1, keys.shape[-2])
        return self.critical_scores(queries, keys, values, capacity, layer_idx)[..., : keys.shape[-2] - self.window_size]

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        scores = self.critical_scores(queries, keys, values, capacity, layer_idx)
        return Selection(scores.topk(capacity, dim=-1).indices.sort(dim=-1).values)
