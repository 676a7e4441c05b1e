"""The store contract: what every per-layer store offers, and the factories that build them.

Dense (:class:`~kvfactory.storage.dense.DenseStore`), quantized (:class:`~kvfactory.storage.quantized.QuantizedStore`)
and ragged (:class:`~kvfactory.storage.ragged.RaggedStore`, and its quantized variant) stores implement
:class:`KVStore`. A :class:`StorageFactory` builds one per layer from what the method kept: rows of equal per-head
length for a method of ``layout == "dense"``, per-head keep masks for ``layout == "ragged"``. The method chooses the
factory (``Compressor.make_storage``), so the cache never tests a store's type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from kvfactory.attention import AttentionSpec
from kvfactory.storage.dense import DenseStore, StoreRow
from kvfactory.storage.ragged import RaggedStore

# rotate(layer_idx, tensor (B, H, T, d), positions (B, H, T), inverse) -> tensor: the model's RoPE at those positions
Rotary = Callable[[int, torch.Tensor, torch.Tensor, bool], torch.Tensor]

# one sample (or a whole unpadded batch) of a head-wise prompt: keys, values (B, Hkv, n, d), positions and
# keep (B, Hkv, n)
MaskedPart = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelContext:
    """What a method needs to know of the patched model to build its storage."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    rotary: Rotary | None = None


class KVStore(Protocol):
    """One layer's kept keys/values, whatever the layout or the precision."""

    length: int  # slots of the longest head

    @property
    def positions(self) -> torch.Tensor:
        """Original positions ``(B, Hkv, T)`` int32 (-1: padding)."""

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, Hkv, T, d)`` in full precision (ragged: left-padded copies)."""

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Append ``n`` tokens to every head (``keys (B, Hkv, n, d)``, ``positions``/``valid (B, n)``)."""

    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the new tokens (the last ones appended) over the store."""

    def mean_kept(self) -> float:
        """Mean real tokens per KV head (padding not counted)."""

    def nbytes(self) -> int:
        """Every byte held."""

    def snapshot(self) -> Any:
        """What :meth:`restore` needs to return here (context reuse)."""

    def restore(self, snapshot: Any) -> None:
        """Drop everything appended after :meth:`snapshot`."""

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Reorder the batch (beam search)."""


class StorageFactory(Protocol):
    def build(self, layer_idx: int, rows: list[StoreRow]) -> Any:
        """A store for ``layer_idx`` holding ``rows`` (one per sample, or one for a whole unpadded batch)."""

    def build_ragged(self, layer_idx: int, parts: list[MaskedPart]) -> Any:
        """A head-wise store for ``layer_idx`` holding the tokens each part's keep mask marks (parts: samples)."""

    def describe(self) -> dict[str, object]:
        """Parameters for run metadata."""


def ragged_from_parts(parts: list[MaskedPart]) -> RaggedStore:
    """A full-precision ragged store of the kept tokens of every part, stacked as one batch."""
    stores = [RaggedStore.from_mask(*part) for part in parts]
    return stores[0] if len(stores) == 1 else RaggedStore.concat(stores)


class DenseStorage:
    """Full-precision storage in the model's dtype."""

    def build(self, layer_idx: int, rows: list[StoreRow]) -> DenseStore:
        return DenseStore.from_rows(rows)

    def build_ragged(self, layer_idx: int, parts: list[MaskedPart]) -> RaggedStore:
        return ragged_from_parts(parts)

    def describe(self) -> dict[str, object]:
        return {"storage": "dense"}


def default_storage() -> StorageFactory:
    """The storage of a cache built without one: full precision."""
    return DenseStorage()


STORE_KINDS = {"dense": DenseStore, "ragged": RaggedStore}  # what a saved cache can hold, by ``store.kind``


def store_from_state(kind: str, tensors: dict[str, torch.Tensor]) -> KVStore:
    """Rebuild a saved store (``store.kind``, ``store.state()``)."""
    if kind not in STORE_KINDS:
        raise ValueError(f"cannot load a store of kind {kind!r}; loadable: {', '.join(STORE_KINDS)}")
    return STORE_KINDS[kind].from_state(tensors)
