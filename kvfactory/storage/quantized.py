"""Quantized per-layer storage: packed quantized blocks of the older tokens plus a full-precision residual.

A :class:`QuantizedStore` offers the surface of :class:`~kvfactory.storage.dense.DenseStore` (so the cache, the
eviction methods and decode-time budgets work unchanged) but holds

- **blocks**: runs of slots encoded by a :class:`~kvfactory.quant.base.KVQuantizer` (packed codes, fp16 scales and
  zero-points, optional sparse outliers / low-rank factors), each with its slots' positions, validity and extras;
- a **residual** :class:`DenseStore` in the model's dtype for the most recent tokens. Appending first moves the
  residual's whole key groups into a new block once it holds ``quant_residual_length`` tokens or more (so the tokens
  being attended are still in full precision, as in KIVI), then appends.

``keys``/``values`` dequantize on the fly (one vectorized decode per block, then a concatenation); nothing
dequantized is kept. ``nbytes`` counts every tensor held. Rows replaced by decode-time eviction are re-quantized
(the kept keys regroup, so this adds error); :meth:`snapshot`/:meth:`restore` make a compressed context reusable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvfactory.attention import AttentionSpec
from kvfactory.quant.base import EncodedTensor, KVQuantizer, LayerRotary
from kvfactory.storage.base import MaskedPart, Rotary, ragged_from_parts
from kvfactory.storage.dense import DenseStore, StoreRow, attend_slots, mean_kept


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A compact copy (a slice would keep its whole parent's storage alive and counted)."""
    return tensor.clone(memory_format=torch.contiguous_format)


def _allocated(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.untyped_storage().nbytes()


@dataclass
class QuantizedBlock:
    """Encoded keys/values of ``n`` slots with their ``positions (B, H, n)``, ``valid (B, n)`` and extras."""

    keys: EncodedTensor
    values: EncodedTensor
    positions: torch.Tensor
    valid: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.positions.shape[-1]

    def nbytes(self) -> int:
        tensors = [self.positions, self.valid, *self.extras.values()]
        return self.keys.nbytes() + self.values.nbytes() + sum(_allocated(t) for t in tensors)

    def index_select(self, batch_index: torch.Tensor) -> "QuantizedBlock":
        return QuantizedBlock(
            self.keys.index_select(batch_index), self.values.index_select(batch_index),
            self.positions.index_select(0, batch_index),
            None if self.valid is None else self.valid.index_select(0, batch_index),
            {name: t.index_select(0, batch_index) for name, t in self.extras.items()},
        )


class QuantizedStore:
    """Keys/values of one layer: quantized blocks followed by a full-precision residual."""

    def __init__(self, quantizer: KVQuantizer, residual: DenseStore, rotate: LayerRotary | None = None,
                 blocks: list[QuantizedBlock] | None = None) -> None:
        self.quantizer = quantizer
        self.rotate = rotate
        self.blocks = blocks or []
        self.residual = residual
        self._flush()

    @classmethod
    def from_rows(cls, rows: list[StoreRow], quantizer: KVQuantizer, rotate: LayerRotary | None = None
                  ) -> "QuantizedStore":
        """Rows (left-padded as :meth:`DenseStore.from_rows` does), their whole key groups quantized at once."""
        quantizer.check_head_dim(rows[0].keys.shape[-1])
        return cls(quantizer, DenseStore.from_rows(rows), rotate)

    # -- reading -----------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return sum(block.length for block in self.blocks) + self.residual.length

    @property
    def quantized_length(self) -> int:
        return sum(block.length for block in self.blocks)

    @property
    def keys(self) -> torch.Tensor:
        dtype = self.residual.keys.dtype
        decoded = [self.quantizer.decode_keys(b.keys, b.positions, self.rotate, dtype) for b in self.blocks]
        return self._joined(decoded, self.residual.keys)

    @property
    def values(self) -> torch.Tensor:
        dtype = self.residual.values.dtype
        return self._joined([b.values.decode().to(dtype) for b in self.blocks], self.residual.values)

    @staticmethod
    def _joined(decoded: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        parts = decoded + ([residual] if residual.shape[2] or not decoded else [])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([block.positions for block in self.blocks] + [self.residual.positions], dim=2)

    @property
    def valid(self) -> torch.Tensor | None:
        parts = [(block.valid, block.length) for block in self.blocks] + [(self.residual.valid, self.residual.length)]
        if all(valid is None for valid, _ in parts):
            return None
        batch = self.residual.positions.shape[0]
        device = self.residual.positions.device
        return torch.cat([torch.ones(batch, length, dtype=torch.bool, device=device) if valid is None else valid
                          for valid, length in parts], dim=1)

    def extra(self, name: str) -> torch.Tensor:
        return torch.cat([block.extras[name] for block in self.blocks] + [self.residual.extra(name)], dim=2)

    @property
    def extra_names(self) -> list[str]:
        return self.residual.extra_names

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def mean_kept(self) -> float:
        return mean_kept(self)

    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the dequantized blocks and the residual (nothing dequantized is kept)."""
        return attend_slots(self, queries, spec, query_valid, query_positions, need_weights)

    def _dense_view(self) -> DenseStore:
        return DenseStore(self.keys, self.values, self.positions, self.valid, {n: self.extra(n) for n in self.extra_names})

    def row(self, b: int) -> StoreRow:
        """Sample ``b``'s real slots, dequantized."""
        return self._dense_view().row(b)

    def nbytes(self) -> int:
        """Every byte held: packed codes, scales, zero-points, outliers, low-rank factors, positions, validity,
        extras and the full-precision residual (with its headroom)."""
        return sum(block.nbytes() for block in self.blocks) + self.residual.nbytes()

    # -- writing -----------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Move the residual's whole key groups into a new block once it holds ``quant_residual_length`` tokens."""
        residual = self.residual
        count = self.quantizer.quantized_prefix(residual.length)
        if count == 0:
            return
        head, rest = slice(0, count), slice(count, residual.length)
        valid = residual.valid
        padding = None if valid is None else ~valid[:, None, head, None]
        positions = residual.positions[:, :, head]
        keys, values = self.quantizer.encode(residual.keys[:, :, head], residual.values[:, :, head], positions,
                                             self.rotate, padding)
        self.blocks.append(QuantizedBlock(
            keys, values, _owned(positions), None if valid is None else _owned(valid[:, head]),
            {name: _owned(residual.extra(name)[:, :, head]) for name in residual.extra_names},
        ))
        self.residual = DenseStore(
            _owned(residual.keys[:, :, rest]), _owned(residual.values[:, :, rest]), _owned(residual.positions[:, :, rest]),
            None if valid is None else _owned(valid[:, rest]),
            {name: _owned(residual.extra(name)[:, :, rest]) for name in residual.extra_names},
        )

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Quantize what the residual gathered (if due), then append the new slots in full precision."""
        self._flush()
        self.residual.append(keys, values, positions, valid)

    def replace_rows(self, rows: list[StoreRow]) -> "QuantizedStore":
        """A store holding ``rows`` (decode-time eviction): re-quantized under the same rule."""
        return QuantizedStore.from_rows(rows, self.quantizer, self.rotate)

    def add_to_extra(self, name: str, amount: torch.Tensor) -> None:
        """Accumulate ``amount (B, Hkv, T)`` into the per-slot state ``name`` (created at zero on first use)."""
        start = 0
        for block in self.blocks:
            if name not in block.extras:
                block.extras[name] = torch.zeros(block.positions.shape, dtype=torch.float32, device=amount.device)
            block.extras[name] += amount[:, :, start : start + block.length]
            start += block.length
        self.residual.add_to_extra(name, amount[:, :, start:])

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on; only residual slots can be forgotten (see :meth:`restore`)."""
        quantized = self.quantized_length
        if length < quantized:
            raise ValueError(f"cannot truncate a quantized store to {length} slots: {quantized} are quantized; "
                             "use snapshot()/restore()")
        self.residual.truncate(length - quantized)

    def snapshot(self) -> dict[str, Any]:
        """What :meth:`restore` needs to return here exactly (the residual copied, block extras cloned)."""
        residual = self.residual
        return {
            "blocks": len(self.blocks),
            "extras": [{name: t.clone() for name, t in block.extras.items()} for block in self.blocks],
            "residual": (residual.keys.clone(), residual.values.clone(), residual.positions.clone(),
                         None if residual.valid is None else residual.valid.clone(),
                         {name: residual.extra(name).clone() for name in residual.extra_names}),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Drop every block and slot added after :meth:`snapshot`; per-slot extras return to their values then."""
        del self.blocks[snapshot["blocks"] :]
        for block, extras in zip(self.blocks, snapshot["extras"]):
            block.extras = {name: t.clone() for name, t in extras.items()}
        keys, values, positions, valid, extras = snapshot["residual"]
        self.residual = DenseStore(keys.clone(), values.clone(), positions.clone(),
                                   None if valid is None else valid.clone(), {n: t.clone() for n, t in extras.items()})

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Reorder the batch (beam search)."""
        batch_index = batch_index.to(self.residual.positions.device)
        self.blocks = [block.index_select(batch_index) for block in self.blocks]
        self.residual.reorder(batch_index)


class QuantizedStorage:
    """Builds a :class:`QuantizedStore` per layer from per-layer quantizers (None: that layer stays dense)."""

    def __init__(self, quantizers: list[KVQuantizer | None], rotary: Rotary | None = None,
                 description: dict[str, object] | None = None) -> None:
        self.quantizers = quantizers
        self.rotary = rotary
        self.description = description or {}

    def layer_rotary(self, layer_idx: int) -> LayerRotary | None:
        rotary = self.rotary
        if rotary is None:
            return None
        return lambda states, positions, inverse: rotary(layer_idx, states, positions, inverse)

    def build(self, layer_idx: int, rows: list[StoreRow]) -> QuantizedStore | DenseStore:
        quantizer = self.quantizers[layer_idx]
        if quantizer is None:
            return DenseStore.from_rows(rows)
        return QuantizedStore.from_rows(rows, quantizer, self.layer_rotary(layer_idx))

    def describe(self) -> dict[str, object]:
        return {"storage": "quantized", **self.description}

