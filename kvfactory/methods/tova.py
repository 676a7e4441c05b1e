"""TOVA: keep what the newest token attends to, averaged over every head."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import WindowedCompressor
from kvfactory.methods.scoring import window_attention


@dataclass(kw_only=True)
class TOVA(WindowedCompressor):
    """Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv:2401.06104).

    Score of past token ``j``: the softmax attention the **last** query gives it, averaged over **all** query heads
    (not per KV-head group), the same score for every KV head. Prefill keeps the ``C - W`` best past tokens plus the
    last ``W``; with ``decode_budget`` the method is re-applied after every generated token (``compress_interval``
    1): the token with the lowest attention from the newest query is evicted, one at a time, as in the paper.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per layer and KV head (default 512).
    window_size:
        Recent tokens always kept (default 1: the newest token, as kvpress's ``TOVAPress`` does).
    decode_budget, compress_interval, max_capacity_prompt_ratio, gqa_score_agg:
        See :class:`~kvfactory.methods.base.WindowedCompressor` (``gqa_score_agg`` is unused: TOVA averages every
        head).
    """

    name = "tova"
    window_size: int = 1
    scores_with_queries = True

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        past = keys.shape[-2] - self.window_size
        attention = window_attention(queries[..., -1:, :], keys, 1)[..., 0, :past]  # (B, Hkv, g, past)
        averaged = attention.float().mean(dim=(1, 2), keepdim=True)[:, :, 0]  # over every query head
        return averaged.expand(keys.shape[0], keys.shape[1], past)

    @property
    def query_window_size(self) -> int:
        return 1 if self.decode_budget is not None else 0
