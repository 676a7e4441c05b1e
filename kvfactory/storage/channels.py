"""Key-channel-pruned dense storage (ThinK): each KV head stores only its kept key channels.

Keys are held as ``(B, Hkv, T, d')`` with the kept channel indices ``(B, Hkv, d')``; values stay ``(B, Hkv, T, d)``.
Attention gathers the same channels of the queries and scales by ``1/√d`` (the model's head size), which equals full
attention over keys whose pruned channels are zero. Methods that score the stored keys see them zero-filled to ``d``
(``keys``), so decode-time scores are computed with the pruned channels. ``nbytes`` counts the pruned keys, the
values, the channel indices and the dense bookkeeping.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kvfactory.attention import AttentionSpec, build_mask
from kvfactory.storage.dense import DenseStore, StoreRow


def gather_channels(keys: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``keys (B, Hkv, T, d)`` reduced to ``channels (B, Hkv, d')``: ``(B, Hkv, T, d')``."""
    return keys.gather(-1, channels[:, :, None, :].expand(-1, -1, keys.shape[-2], -1))


def scatter_channels(pruned: torch.Tensor, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`gather_channels`, zeros in the pruned channels: ``(B, Hkv, T, d)``."""
    full = pruned.new_zeros(*pruned.shape[:-1], head_dim)
    return full.scatter_(-1, channels[:, :, None, :].expand(-1, -1, pruned.shape[-2], -1), pruned)


class ChannelPrunedStore:
    """A :class:`~kvfactory.storage.dense.DenseStore` of pruned keys plus the channels each (sample, head) kept."""

    kind = "think"  # not loadable by kvfactory.persist (store_from_state names the loadable kinds)

    def __init__(self, inner: DenseStore, channels: torch.Tensor, head_dim: int) -> None:
        self.inner = inner
        self.channels = channels.contiguous()
        self.head_dim = head_dim

    @classmethod
    def from_rows(cls, rows: list[StoreRow], channels: list[torch.Tensor], head_dim: int) -> "ChannelPrunedStore":
        pruned = [StoreRow(gather_channels(row.keys, ch), row.values, row.positions, row.extras)
                  for row, ch in zip(rows, channels)]
        return cls(DenseStore.from_rows(pruned), torch.cat(channels), head_dim)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def keys(self) -> torch.Tensor:
        """Keys zero-filled to ``d`` (for scoring; attention reads the pruned ones)."""
        return scatter_channels(self.inner.keys, self.channels, self.head_dim)

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.inner.values

    def row(self, b: int) -> StoreRow:
        row = self.inner.row(b)
        return StoreRow(scatter_channels(row.keys, self.channels[b : b + 1], self.head_dim), row.values,
                        row.positions, row.extras)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        self.inner.append(gather_channels(keys, self.channels), values, positions, valid)

    def replace_rows(self, rows: list[StoreRow]) -> "ChannelPrunedStore":
        if len(rows) == 1 and rows[0].keys.shape[0] == self.channels.shape[0]:
            channels = [self.channels]
        else:
            channels = [self.channels[b : b + 1] for b in range(len(rows))]
        pruned = [StoreRow(gather_channels(row.keys, ch), row.values, row.positions, row.extras)
                  for row, ch in zip(rows, channels)]
        self.inner = self.inner.replace_rows(pruned)
        return self

    def reorder(self, batch_index: torch.Tensor) -> None:
        self.inner.reorder(batch_index)
        self.channels = self.channels.index_select(0, batch_index.to(self.channels.device))

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.channels.untyped_storage().nbytes()

    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the new tokens over the store, through the kept channels only (scale ``1/√d``)."""
        batch, num_q_heads, n, head_dim = queries.shape
        keys, values = self.inner.keys, self.inner.values
        heads, total = keys.shape[1], keys.shape[-2]
        groups = num_q_heads // heads
        grouped = queries.reshape(batch, heads, groups * n, head_dim)
        picked = grouped.gather(-1, self.channels[:, :, None, :].expand(-1, -1, groups * n, -1))
        logits = (picked.float() @ keys.float().transpose(-1, -2) / math.sqrt(head_dim))
        logits = logits.view(batch, heads, groups, n, total)
        mask = build_mask(batch, n, total, keys.device, key_valid=self.inner.valid, query_valid=query_valid,
                          sliding_window=spec.sliding_window, query_positions=query_positions,
                          key_positions=self.inner.positions)
        if mask is None and n > 1:
            mask = torch.ones(n, total, dtype=torch.bool, device=keys.device).tril(total - n)[None, None]
        if mask is not None:
            logits = logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=-1)
        output = weights.to(values.dtype).reshape(batch, heads, groups * n, total) @ values
        return output.view(batch, num_q_heads, n, values.shape[-1]), (weights if need_weights else None)


class ChannelPrunedStorage:
    """Builds :class:`ChannelPrunedStore` layers from ThinK's kept tokens and the channels it chose (handed over by
    ``pending``, one entry per compressed row, in order)."""

    def __init__(self, pending: dict[int, list[torch.Tensor]], head_dim: int) -> None:
        self.pending = pending
        self.head_dim = head_dim

    def build(self, layer_idx: int, rows: list[StoreRow]) -> ChannelPrunedStore:
        queue = self.pending.get(layer_idx, [])
        if len(queue) < len(rows):
            raise RuntimeError("think: kept channels are missing for this layer (prefill_chunk_size and quantization "
                               "are not supported with think)")
        channels = [queue.pop(0) for _ in rows]
        return ChannelPrunedStore.from_rows(rows, channels, self.head_dim)

    def build_ragged(self, layer_idx: int, parts: list[Any]) -> Any:
        raise ValueError("think prunes key channels of a dense (per-token) method; head-wise methods are not supported")

    def describe(self) -> dict[str, object]:
        return {"storage": "key-channel-pruned"}
