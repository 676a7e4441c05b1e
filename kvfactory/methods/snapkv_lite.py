"""SnapKV-lite: SnapKV's layout voted by inverted key norms instead of attention (kvcompress)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import WindowedCompressor
from kvfactory.methods.scoring import pool_scores


@dataclass(kw_only=True)
class SnapKVLite(WindowedCompressor):
    """kvcompress's ``snapkv_lite``: SnapKV's layout (Li et al. 2024, arXiv:2404.14469) without attention. The last
    ``window_size`` tokens (the observation window) are kept, and of the older ones the ``C − window_size`` with the
    highest *inverted* key norm ``−‖k‖`` (Devoto et al. 2024, arXiv:2406.11430), smoothed by pooling over
    ``kernel_size`` neighbours as SnapKV pools its votes. No attention is computed.

    Parameters
    ----------
    max_capacity_prompt:
        ``C`` = kvcompress's ``window_size + keep_size`` (default 512).
    window_size:
        kvcompress's ``observation_window`` (default 32; it used 16/32/64).
    kernel_size:
        Pooling width (default 7).
    pooling:
        ``maxpool`` (default) or ``avgpool``.
    decode_budget, compress_interval:
        See :class:`~kvfactory.methods.base.BudgetedCompressor`.
    """

    name = "snapkv_lite"
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "maxpool"
    scores_are_attention_mass = False

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        past = keys.shape[-2] - self.window_size
        return pool_scores(-keys[..., :past, :].float().norm(dim=-1), self.kernel_size, self.pooling)
