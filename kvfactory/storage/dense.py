"""Dense per-layer storage: ``(B, Hkv, T, d)`` keys and values, every head holding the same number of slots.

Besides keys and values a store keeps, per slot, the token's position ``(B, Hkv, T)`` int32 (sliding windows,
provenance, tests) and optional per-slot state ``extras`` (``(B, Hkv, T)``, e.g. H2O's accumulated attention). When
the samples of a batch keep different numbers of tokens, rows are left-padded and ``valid (B, T)`` marks real slots.

Memory is real: after prefill compression the store is built at exactly the kept size (the full prompt's
tensors are released); decoding appends into headroom of 1/16 of the length (at least :data:`MIN_HEADROOM` slots),
so a step costs no full copy, and decode-time eviction compacts the kept slots in place. ``nbytes`` counts every
allocated byte, headroom included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvfactory.attention import AttentionSpec, attend

MIN_HEADROOM = 8  # slots added beyond the needed length when a store grows
HEADROOM_FRACTION = 16  # ... or length // HEADROOM_FRACTION, whichever is larger


def headroom(length: int) -> int:
    """Slots a store adds beyond the ``length`` it needs when it grows (the rule dense and ragged tails share)."""
    return max(MIN_HEADROOM, length // HEADROOM_FRACTION)


def _allocated_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.untyped_storage().nbytes()


@dataclass
class StoreRow:
    """One sample's kept tokens: keys/values ``(1, Hkv, k, d)``, positions ``(1, Hkv, k)``, extras ``(1, Hkv, k)``."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class SlotReads:
    """What dense and quantized stores answer alike from their ``keys``/``values (B, Hkv, T, d)``, ``positions``,
    ``valid (B, T)`` (None: every slot real) and ``length`` (a mixin)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None
    length: int

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def mean_kept(self) -> float:
        """Mean real tokens per KV head over the batch (padding not counted)."""
        valid = self.valid
        return float(self.length if valid is None else valid.sum(1).float().mean())

    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the new tokens (the store's last ones) over every slot, masking invalid slots and, for a
        sliding window, by ``positions`` (a quantized store dequantizes its blocks for it, keeping nothing)."""
        return attend(queries, self.keys, self.values, spec, key_valid=self.valid, query_valid=query_valid,
                      query_positions=query_positions, key_positions=self.positions, need_weights=need_weights)


class DenseStore(SlotReads):
    """Keys/values of one layer at KV-head granularity."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._keys = keys.contiguous()
        self._values = values.contiguous()
        self._positions = positions.to(torch.int32).contiguous()
        self._valid = None if valid is None or bool(valid.all()) else valid.contiguous()
        self._extras = {name: tensor.contiguous() for name, tensor in (extras or {}).items()}
        self.length = keys.shape[-2]

    # -- building ----------------------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: list[StoreRow]) -> "DenseStore":
        """Stack per-sample rows, left-padding the shorter ones (padding slots are invalid, position -1)."""
        longest = max(row.keys.shape[-2] for row in rows)
        if all(row.keys.shape[-2] == longest for row in rows):
            return cls(
                torch.cat([row.keys for row in rows]), torch.cat([row.values for row in rows]),
                torch.cat([row.positions for row in rows]), None,
                {name: torch.cat([row.extras[name] for row in rows]) for name in rows[0].extras},
            )
        first = rows[0].keys
        batch, heads, head_dim = len(rows), first.shape[1], first.shape[-1]
        keys = first.new_zeros(batch, heads, longest, head_dim)
        values = first.new_zeros(batch, heads, longest, rows[0].values.shape[-1])  # ThinK: keys may be thinner
        positions = torch.full((batch, heads, longest), -1, dtype=torch.int32, device=first.device)
        valid = torch.zeros(batch, longest, dtype=torch.bool, device=first.device)
        extras = {name: first.new_zeros(batch, heads, longest, dtype=torch.float32) for name in rows[0].extras}
        for b, row in enumerate(rows):
            kept = row.keys.shape[-2]
            keys[b, :, longest - kept :] = row.keys[0]
            values[b, :, longest - kept :] = row.values[0]
            positions[b, :, longest - kept :] = row.positions[0]
            valid[b, longest - kept :] = True
            for name, tensor in row.extras.items():
                extras[name][b, :, longest - kept :] = tensor[0]
        return cls(keys, values, positions, valid, extras)

    # -- reading -----------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Channels per key and value (without building a view of the keys)."""
        return self._keys.shape[-1]

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[:, : self.length]

    def extra(self, name: str) -> torch.Tensor:
        return self._extras[name][:, :, : self.length]

    @property
    def extra_names(self) -> list[str]:
        return list(self._extras)

    def row(self, b: int) -> StoreRow:
        """Sample ``b``'s real slots."""
        slots = slice(None) if self._valid is None else self.valid[b].nonzero().flatten()
        pick = (lambda t: t[b : b + 1, :, slots]) if isinstance(slots, slice) else (
            lambda t: t[b : b + 1].index_select(2, slots)
        )
        return StoreRow(
            pick(self.keys), pick(self.values), pick(self.positions), {n: pick(self.extra(n)) for n in self._extras}
        )

    kind = "dense"

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to rebuild this store (``from_state``), at its used length."""
        tensors = {"keys": self.keys, "values": self.values, "positions": self.positions}
        if self.valid is not None:
            tensors["valid"] = self.valid
        tensors.update({f"extra.{name}": self.extra(name) for name in self.extra_names})
        return {name: t.contiguous() for name, t in tensors.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "DenseStore":
        extras = {name.removeprefix("extra."): t for name, t in tensors.items() if name.startswith("extra.")}
        return cls(tensors["keys"], tensors["values"], tensors["positions"], tensors.get("valid"), extras)

    def snapshot(self) -> Any:
        """The length and the per-slot extras: appended slots are simply forgotten by :meth:`restore`."""
        return self.length, {name: self.extra(name).clone() for name in self.extra_names}

    def restore(self, snapshot: Any) -> None:
        length, extras = snapshot
        self.truncate(length)
        for name, values in extras.items():
            self.extra(name).copy_(values)

    def nbytes(self) -> int:
        """Every byte this store holds (headroom, positions, validity and extras included)."""
        tensors = [self._keys, self._values, self._positions, self._valid, *self._extras.values()]
        return sum(_allocated_bytes(t) for t in tensors)

    # -- writing -----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Append ``n`` new slots per head (``keys (B, Hkv, n, d)``, ``positions (B, n)``, ``valid (B, n)``)."""
        n = keys.shape[-2]
        if self.length + n > self._keys.shape[-2]:
            needed = self.length + n
            self._grow(needed + headroom(needed))
        end = self.length + n
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self._positions[:, :, self.length : end] = positions[:, None, :].to(torch.int32)
        for tensor in self._extras.values():
            tensor[:, :, self.length : end] = 0
        if valid is not None and self._valid is None and not bool(valid.all()):
            self._valid = torch.ones(self._keys.shape[0], self._keys.shape[-2], dtype=torch.bool, device=keys.device)
        if self._valid is not None:
            self._valid[:, self.length : end] = True if valid is None else valid
        self.length = end

    def replace_rows(self, rows: list[StoreRow]) -> "DenseStore":
        """The store holding ``rows`` instead: compacted in place (keeping the headroom) when every row has the same
        length, or a new left-padded store otherwise."""
        kept = rows[0].keys.shape[-2]
        same_layout = (
            len(rows) == self._keys.shape[0] and all(row.keys.shape[-2] == kept for row in rows)
            and kept <= self._keys.shape[-2] and set(rows[0].extras) == set(self._extras)
        )
        if not same_layout:
            return DenseStore.from_rows(rows)
        self._keys[:, :, :kept] = torch.cat([row.keys for row in rows])
        self._values[:, :, :kept] = torch.cat([row.values for row in rows])
        self._positions[:, :, :kept] = torch.cat([row.positions for row in rows])
        for name, tensor in self._extras.items():
            tensor[:, :, :kept] = torch.cat([row.extras[name] for row in rows])
        self._valid = None
        self.length = kept
        return self

    def add_to_extra(self, name: str, amount: torch.Tensor) -> None:
        """Accumulate ``amount (B, Hkv, T)`` into the per-slot state ``name`` (created at zero on first use)."""
        if name not in self._extras:
            self._extras[name] = torch.zeros(self._positions.shape, dtype=torch.float32, device=amount.device)
        self._extras[name][:, :, : self.length] += amount

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (the tensors keep their allocation as headroom)."""
        self.length = min(self.length, length)

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Reorder the batch (beam search)."""
        batch_index = batch_index.to(self._keys.device)
        self._keys = self._keys.index_select(0, batch_index)
        self._values = self._values.index_select(0, batch_index)
        self._positions = self._positions.index_select(0, batch_index)
        if self._valid is not None:
            self._valid = self._valid.index_select(0, batch_index)
        self._extras = {n: t.index_select(0, batch_index) for n, t in self._extras.items()}

    def _grow(self, capacity: int) -> None:
        def grown(tensor: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[2 if tensor.dim() >= 3 else 1] = capacity
            bigger = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
            if tensor.dim() >= 3:
                bigger[:, :, : self.length] = tensor[:, :, : self.length]
            else:
                bigger[:, : self.length] = tensor[:, : self.length]
            return bigger

        self._keys = grown(self._keys)
        self._values = grown(self._values)
        self._positions = grown(self._positions, -1)
        if self._valid is not None:
            self._valid = grown(self._valid, False)
        self._extras = {name: grown(tensor) for name, tensor in self._extras.items()}
