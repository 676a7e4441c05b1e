"""How a cache builds the storage of a layer: dense full precision by default, quantized or ragged by plug-in.

A store exposes the surface :class:`~kvfactory.storage.dense.DenseStore` defines (``keys``/``values`` in full
precision for attention, ``positions``, ``valid``, per-slot extras, ``append``, ``replace_rows``, ``row``,
``nbytes``, ``truncate``, ``reorder``, ``length``). A :class:`StorageFactory` builds one per layer from the kept rows.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from kvfactory.storage.dense import DenseStore, StoreRow

# rotate(layer_idx, tensor (B, H, T, d), positions (B, H, T), inverse) -> tensor: the model's RoPE at those positions
Rotary = Callable[[int, torch.Tensor, torch.Tensor, bool], torch.Tensor]


class StorageFactory(Protocol):
    def build(self, layer_idx: int, rows: list[StoreRow]) -> Any:
        """A store for ``layer_idx`` holding ``rows`` (one per sample, or one for a whole unpadded batch)."""

    def describe(self) -> dict[str, object]:
        """Parameters for run metadata."""


class DenseStorage:
    """Full-precision storage in the model's dtype."""

    def build(self, layer_idx: int, rows: list[StoreRow]) -> DenseStore:
        return DenseStore.from_rows(rows)

    def describe(self) -> dict[str, object]:
        return {"storage": "dense"}
