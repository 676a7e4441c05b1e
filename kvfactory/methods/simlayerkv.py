"""SimLayerKV: trim only the "lazy" layers to initial + recent tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import BudgetedCompressor, Kept, all_positions
from kvfactory.methods.scoring import gather_tokens, window_attention


@dataclass(kw_only=True)
class SimLayerKV(BudgetedCompressor):
    """SimLayerKV (Zhang et al. 2024, "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
    arXiv:2410.13846), as kvpress's ``SimLayerKVPress``.

    A layer is *lazy* when the last ``n_last`` queries put more than ``lazy_threshold`` of their attention (averaged
    over those queries, every query head and the samples of the call) on the first ``n_initial`` tokens plus the
    ``C − n_initial + n_last`` tokens before the query window. A lazy layer keeps the first ``n_initial`` and the last
    ``C − n_initial`` tokens (``C`` in all, kvpress's ``n_initial + n_recent − n_last``); the other layers keep
    everything. Prompts of at most ``C + n_last`` tokens are kept whole.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens a lazy layer keeps (default 512; kvpress's ``n_recent = C − n_initial + n_last``).
    lazy_threshold:
        Attention share on initial + recent tokens above which a layer is lazy (default 0.9).
    n_last:
        Queries whose attention decides (default 1, SimLayerKV-decode).
    n_initial:
        Leading tokens a lazy layer keeps (default 4).
    decode_budget, compress_interval, max_capacity_prompt_ratio:
        See :class:`~kvfactory.methods.base.BudgetedCompressor`; while decoding the laziness is decided again on the
        last ``n_last`` queries and only lazy layers are trimmed.
    """

    name = "simlayerkv"
    lazy_threshold: float = 0.9
    n_last: int = 1
    n_initial: int = 4

    def __post_init__(self) -> None:
        for name in ("n_last", "n_initial"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "n_last" else 0):
                raise ValueError(f"simlayerkv: {name} must be an integer >= {1 if name == 'n_last' else 0}, "
                                 f"got {value!r}")
        super().__post_init__()

    def min_capacity(self) -> int:
        return self.n_initial + 1

    def min_capacity_reason(self) -> str:
        return f"larger than n_initial={self.n_initial}"

    @property
    def query_window_size(self) -> int:
        return self.n_last if self.decode_budget is not None else 0

    def lazy_share(self, queries: torch.Tensor, keys: torch.Tensor, capacity: int) -> float:
        """The attention share on initial + recent tokens (the laziness statistic)."""
        n_last = min(self.n_last, queries.shape[-2])
        attention = window_attention(queries[..., -n_last:, :], keys, n_last).float()
        before = attention[..., : keys.shape[-2] - n_last].mean(dim=(0, 1, 2, 3))  # over samples, heads, queries
        recent = capacity - self.n_initial + n_last
        return float(before[: self.n_initial].sum() + before[-recent:].sum())

    def is_lazy(self, queries: torch.Tensor, keys: torch.Tensor, capacity: int) -> bool:
        return self.lazy_share(queries, keys, capacity) > self.lazy_threshold

    def compress_tokens(self, queries, keys, values, *, layer_idx=0, num_layers=1, capacity=None, accumulated=None,
                        prefill_attention=None) -> Kept:
        n = keys.shape[-2]
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, n)
        if capacity + min(self.n_last, queries.shape[-2]) > n or not self.is_lazy(queries, keys, capacity):
            return Kept(keys, values, all_positions(keys), accumulated)
        batch, heads = keys.shape[:2]
        positions = torch.cat([torch.arange(self.n_initial), torch.arange(n - capacity + self.n_initial, n)])
        indices = positions.to(keys.device).expand(batch, heads, capacity)
        return Kept(gather_tokens(keys, indices), gather_tokens(values, indices), indices)
