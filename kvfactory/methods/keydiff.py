"""KeyDiff: keep the keys least like the average key."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvfactory.methods.base import WindowedCompressor


@dataclass(kw_only=True)
class KeyDiff(WindowedCompressor):
    """Keeps the most distinctive keys (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for
    Long-Context LLM Inference in Resource-Constrained Environments", arXiv:2504.15364). Query-free.

    Anchor of a KV head: the mean of its L2-normalized keys over the whole sequence. Score of past token ``j``:
    ``−cos(k_j, anchor)``; the ``C - W`` highest are kept plus the last ``W``.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per layer and KV head (default 512).
    window_size:
        Recent tokens always kept (default 0, as kvpress's ``KeyDiffPress``).
    decode_budget, compress_interval, max_capacity_prompt_ratio:
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "keydiff"
    window_size: int = 0
    scores_are_attention_mass = False  # negative cosines

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        past = keys.shape[-2] - self.window_size
        keys = keys.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=-2, keepdim=True)
        return -F.cosine_similarity(keys[..., :past, :], anchor, dim=-1)
