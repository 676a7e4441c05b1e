"""SnapKV: keep what the observation window attends to."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import WindowedCompressor
from kvfactory.methods.scoring import pool_scores, reduce_groups, window_attention


@dataclass(kw_only=True)
class SnapKV(WindowedCompressor):
    """Keeps the ``C - W`` past tokens the last ``W`` queries attend to most, plus those ``W`` tokens (Li et al. 2024,
    "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469).

    Score of past token ``j``: ``Σ_{i in window} softmax(q_i K^T / √d)_j`` (causal inside the window, fp32 softmax
    cast back to the model dtype), reduced over each KV head's query group by ``gqa_score_agg``, then pooled.

    Parameters
    ----------
    max_capacity_prompt, window_size, gqa_score_agg, decode_budget, compress_interval:
        See :class:`~kvfactory.methods.base.WindowedCompressor` (defaults C=512, W=8: KVCache-Factory's runners).
    kernel_size:
        Pooling width over the sequence (default 7).
    pooling:
        ``maxpool`` (default) or ``avgpool`` (the latter counts the zero padding, as ``avg_pool1d`` does).
    merge:
        ``None``, ``"pivot"`` or ``"weighted"``: fold evicted tokens into their most similar kept token.
    """

    name = "snapkv"
    kernel_size: int = 7
    pooling: str = "maxpool"
    merge: str | None = None
    scores_with_queries = True

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        past = keys.shape[-2] - self.window_size
        attention = window_attention(queries, keys, self.window_size)  # (B, Hkv, g, W, n)
        summed = attention[..., :past].sum(dim=-2)  # over window queries, in the model dtype as SnapKV
        return pool_scores(reduce_groups(summed, self.gqa_score_agg), self.kernel_size, self.pooling)
