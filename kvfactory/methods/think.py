"""ThinK: prune key channels per KV head by query-key interaction magnitude, really dropping them from storage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvfactory.methods.base import BudgetedCompressor, Compressor, Kept, all_positions
from kvfactory.methods.scoring import PrefillAttention
from kvfactory.storage.base import ModelContext, StorageFactory
from kvfactory.storage.channels import ChannelPrunedStorage


def channel_scores(queries: torch.Tensor, keys: torch.Tensor, window_size: int) -> torch.Tensor:
    """ThinK's channel importance ``(B, Hkv, d)``: mean over the last ``window_size`` queries of ``q²`` (averaged
    over the KV head's query group) times the mean over every token of ``k²``."""
    batch, heads, _, dim = keys.shape
    window = queries[..., -window_size:, :].float()
    query_power = window.pow(2).mean(dim=2).view(batch, heads, -1, dim).mean(dim=2)
    return query_power * keys.float().pow(2).mean(dim=2)


def kept_channels(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Ascending indices ``(B, Hkv, d − int(d · ratio))`` of the channels kept (the lowest scores are pruned)."""
    dim = scores.shape[-1]
    keep = dim - int(dim * ratio)
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


@dataclass(kw_only=True)
class ThinK(BudgetedCompressor):
    """ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018), as kvpress's
    ``ThinKPress`` scores it, with the channels really dropped.

    At prefill, per (sample, KV head), the ``int(d · key_channel_compression_ratio)`` key channels with the lowest
    ``mean_window(q²) · mean_tokens(k²)`` are pruned. The cache stores only the kept channels (bytes counted) and
    attends through them; a token method (``token_method``) selects tokens on the keys with the pruned channels
    zeroed, at prefill and while decoding, so "snapkv + ThinK 0.5" is ``get("think", token_method="snapkv",
    max_capacity_prompt=C)``. Channels are chosen once, at prefill.

    Parameters
    ----------
    key_channel_compression_ratio:
        Share of key channels pruned (default 0.5).
    window_size:
        Recent queries that score the channels (default 32, kvpress).
    token_method:
        A dense token-eviction method run on the pruned keys (default None: keep every token), with
        ``token_method_kwargs``; this method's ``max_capacity_prompt``, ``decode_budget`` and
        ``compress_interval`` are passed to it unless the kwargs set them.
    max_capacity_prompt, decode_budget, compress_interval, max_capacity_prompt_ratio:
        The token method's budget (see :class:`~kvfactory.methods.base.BudgetedCompressor`).
    """

    name = "think"
    key_channel_compression_ratio: float = 0.5
    window_size: int = 32
    token_method: str | None = None
    token_method_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.key_channel_compression_ratio < 1:
            raise ValueError(f"think: key_channel_compression_ratio must be in [0, 1), got "
                             f"{self.key_channel_compression_ratio!r}")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"think: window_size must be a positive integer, got {self.window_size!r}")
        super().__post_init__()
        self.tokens: Compressor | None = None
        self._pending: dict[int, list[torch.Tensor]] = {}

    def bind_token_method(self, method: Compressor) -> None:
        """Evict tokens with ``method`` (kvfactory.methods.get calls this with the built ``token_method``)."""
        if method.layout != "dense":
            raise ValueError(f"think: token_method must be a dense (per-token) method, got {method.name!r}")
        self.tokens = method

    def token_method_params(self) -> dict[str, Any]:
        params = dict(self.token_method_kwargs or {})
        for key in ("max_capacity_prompt", "max_capacity_prompt_ratio", "decode_budget"):
            if getattr(self, key) is not None and "max_capacity_prompt_ratio" not in params:
                params.setdefault(key, getattr(self, key))
        if "max_capacity_prompt_ratio" in params:
            params.pop("max_capacity_prompt", None)
        params.setdefault("compress_interval", self.compress_interval)
        return params

    def attach(self, handle: Any) -> None:
        if self.tokens is not None:
            self.tokens.attach(handle)

    # -- the contract, the token method's where it has one ------------------------------------------------------
    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        return seq_len if self.tokens is None else self.tokens.capacity(layer_idx, num_layers, seq_len, budget)

    @property
    def decode_budget_tokens(self) -> int | None:
        return None if self.tokens is None else self.tokens.decode_budget_tokens

    @property
    def decode_interval(self) -> int:
        return 1 if self.tokens is None else self.tokens.decode_interval

    @property
    def query_window_size(self) -> int:
        return 0 if self.tokens is None else self.tokens.query_window_size

    @property
    def needs_decode_attention(self) -> bool:
        return self.tokens is not None and self.tokens.needs_decode_attention

    def decode_attention_scores(self, weights: torch.Tensor) -> torch.Tensor:
        assert self.tokens is not None
        return self.tokens.decode_attention_scores(weights)

    def token_scores(self, queries: torch.Tensor, keys: torch.Tensor,
                     prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        assert self.tokens is not None
        return self.tokens.token_scores(queries, keys, prefill_attention)

    def make_storage(self, context: ModelContext) -> StorageFactory:
        self._pending = {}
        return ChannelPrunedStorage(self._pending, context.head_dim)

    def prune(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept channels ``(B, Hkv, d')`` and the keys with the pruned channels zeroed."""
        channels = kept_channels(channel_scores(queries, keys, self.window_size), self.key_channel_compression_ratio)
        zeroed = torch.zeros_like(keys)
        index = channels[:, :, None, :].expand(-1, -1, keys.shape[-2], -1)
        return channels, zeroed.scatter_(-1, index, keys.gather(-1, index))

    def compress_tokens(self, queries, keys, values, *, layer_idx=0, num_layers=1, capacity=None, accumulated=None,
                        prefill_attention=None) -> Kept:
        prefill = queries.shape[-2] == keys.shape[-2]
        if prefill:  # channels are chosen once, on the prompt; later calls see keys already zero-filled
            channels, keys = self.prune(queries, keys)
            self._pending.setdefault(layer_idx, []).append(channels)
        if self.tokens is None:
            return Kept(keys, values, all_positions(keys), accumulated)
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, keys.shape[-2])
        return self.tokens.compress_tokens(queries, keys, values, layer_idx=layer_idx, num_layers=num_layers,
                                           capacity=capacity, accumulated=accumulated,
                                           prefill_attention=None if prefill else prefill_attention)

    def compress(self, query_states, key_states, value_states, layer_idx=0, num_layers=1):
        """Kept keys (pruned channels zeroed, full ``d``) and values; the cache stores only the kept channels."""
        keys, values = super().compress(query_states, key_states, value_states, layer_idx, num_layers)
        self._pending.pop(layer_idx, None)
        return keys, values
