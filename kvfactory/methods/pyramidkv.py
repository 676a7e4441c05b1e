"""PyramidKV: SnapKV scores under a budget that shrinks with depth."""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.methods.snapkv import SnapKV


def pyramid_capacity(total: int, window: int, beta: int, layer_idx: int, num_layers: int, seq_len: int) -> int:
    """Tokens layer ``layer_idx`` keeps under KVCache-Factory's PyramidKV schedule for a budget of ``total``."""
    past_budget = total - window
    if seq_len < total:
        return seq_len
    if seq_len < 2 * past_budget or num_layers == 1:
        return total
    low = past_budget // beta
    high = 2 * past_budget - low
    if high >= seq_len - window:
        high = seq_len - window
        low = 2 * past_budget - high
    step = (high - low) // (num_layers - 1)
    return high - layer_idx * step + window


@dataclass(kw_only=True)
class PyramidKV(SnapKV):
    """SnapKV selection with KVCache-Factory's per-layer schedule (Cai et al. 2024, "PyramidKV: Dynamic KV Cache
    Compression based on Pyramidal Information Funneling", arXiv:2406.02069).

    With ``P = C - W``: a prompt shorter than ``C`` is kept whole; shorter than ``2P`` every layer keeps ``P``;
    otherwise layer ``l`` keeps ``hi - l·step`` past tokens (``lo = P // beta``, ``hi = 2P - lo``, clipped to
    ``n - W``; ``step = (hi - lo) // (L - 1)``), plus the window. Layer 0 keeps the most and can exceed ``C``.

    Parameters
    ----------
    beta:
        Steepness of the pyramid (default 20; fixed in KVCache-Factory, exposed here).
    (others):
        As :class:`~kvfactory.methods.snapkv.SnapKV`.
    """

    name = "pyramidkv"
    beta: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.beta, int) or self.beta < 1:
            raise ValueError(f"pyramidkv: beta must be a positive integer, got {self.beta!r}")
        super().__post_init__()

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        total = super().capacity(layer_idx, num_layers, seq_len, budget)
        return pyramid_capacity(total, self.window_size, self.beta, layer_idx, num_layers, seq_len)
