"""L2Norm: keep the keys with the smallest norm."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvfactory.methods.base import WindowedCompressor


@dataclass(kw_only=True)
class L2Norm(WindowedCompressor):
    """Keeps the ``C`` tokens whose keys have the lowest L2 norm (Devoto et al. 2024, "A Simple and Effective L2
    Norm-Based Strategy for KV Cache Compression", arXiv:2406.11430). Query-free.

    Parameters
    ----------
    skip_layers:
        Layers left uncompressed (default ``[0, 1]``, as KVCache-Factory and the paper).
    window_size:
        Recent tokens always kept. Default 0: no protected window, as in the paper and KVCache-Factory, so the most
        recent tokens can be evicted.
    (others):
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "l2norm"
    window_size: int = 0
    skip_layers: list[int] = field(default_factory=lambda: [0, 1])
    scores_are_attention_mass = False  # minus key norms

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if layer_idx in self.skip_layers:
            return seq_len
        return super().capacity(layer_idx, num_layers, seq_len, budget)

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        past = keys.shape[-2] - self.window_size
        return -keys[..., :past, :].float().norm(dim=-1)
