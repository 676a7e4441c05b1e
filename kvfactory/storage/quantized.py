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
from kvfactory.storage import fused_decode as decode
from kvfactory.quant.base import EncodedTensor, KVQuantizer, LayerRotary
from kvfactory.storage.base import MaskedPart, Rotary, ragged_from_parts
from kvfactory.storage.dense import DenseStore, SlotReads, StoreRow
from kvfactory.storage.ragged import RaggedStore


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


class QuantizedStore(SlotReads):
    """Keys/values of one layer: quantized blocks followed by a full-precision residual."""

    kind = "quantized"

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("saving a quantized cache is not supported yet: save the full-precision cache "
                                  "(without quant_method) or recompute the context")

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

    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the blocks and the residual: decoding reads the packed codes directly when the fused
        kernel covers the case (:mod:`kvfactory.storage.fused_decode`), else over the dequantized blocks (nothing
        dequantized is kept)."""
        fused = decode.quantized_store_attend(self, queries, spec, query_valid, need_weights)
        if fused is not None:
            return fused, None
        return super().attend(queries, spec, query_valid=query_valid, query_positions=query_positions,
                              need_weights=need_weights)

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


class QuantizedRaggedStore(RaggedStore):
    """A head-wise (ragged) store whose prefix is quantized: what a head-wise method kept at prefill.

    The flat prefix ``(N, d)`` (segments of ``(sample, KV head)`` one after the other, see
    :class:`~kvfactory.storage.ragged.RaggedStore`) is encoded whole as one ``(1, 1, N, d)`` block, its last key
    group padded to ``q_group_size`` rows (padding sets no range; its codes are counted in the bytes). Keys are thus
    quantized per channel over ``q_group_size`` consecutive prefix rows, which may span two heads' segments (their
    ranges are shared); values per token as always. The tokens appended while decoding (the tail) form the
    full-precision residual, until a decode-time re-compression rebuilds, and re-quantizes, the store. Attention
    dequantizes the block each step into a temporary (nothing dequantized is kept); ``nbytes`` counts the packed
    codes, scales, zero-points, outliers, low-rank factors, the tail and the bookkeeping.
    """

    kind = "quantized"

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("saving a quantized cache is not supported yet: save the full-precision cache "
                                  "(without quant_method) or recompute the context")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                 quantizer: KVQuantizer, rotate: LayerRotary | None = None) -> None:
        super().__init__(keys, values, positions, lengths)
        quantizer.check_head_dim(keys.shape[-1])
        self.quantizer = quantizer
        self.rotate = rotate
        count = keys.shape[0]
        self.quantized_rows = count
        self.encoded: tuple[EncodedTensor, EncodedTensor] | None = None
        if count:
            padded = -(-count // quantizer.q_group_size) * quantizer.q_group_size
            exclude = (torch.arange(padded, device=keys.device) >= count).view(1, 1, padded, 1)
            self.encoded = quantizer.encode(self._padded_rows(keys, padded), self._padded_rows(values, padded),
                                            self._block_positions(padded), rotate,
                                            exclude if padded > count else None)
            self._keys = self._keys[count:].clone()
            self._values = self._values[count:].clone()

    @staticmethod
    def _padded_rows(rows: torch.Tensor, padded: int) -> torch.Tensor:
        """``rows (N, d)`` as a ``(1, 1, padded, d)`` block, zero rows after ``N``."""
        block = rows.new_zeros(padded, rows.shape[-1])
        block[: rows.shape[0]] = rows
        return block.view(1, 1, padded, -1)

    def _block_positions(self, padded: int) -> torch.Tensor:
        block = torch.zeros(padded, dtype=torch.int32, device=self.flat_positions.device)
        block[: self.quantized_rows] = self.flat_positions[: self.quantized_rows]
        return block.view(1, 1, padded)

    @classmethod
    def quantize(cls, store: RaggedStore, quantizer: KVQuantizer, rotate: LayerRotary | None = None
                 ) -> "QuantizedRaggedStore":
        """The quantized version of a full-precision ragged store with an empty tail."""
        if store.tail_length:
            raise ValueError("only a ragged store with an empty tail can be quantized")
        return cls(store.flat_keys, store.flat_values, store.flat_positions, store.lengths, quantizer, rotate)

    @property
    def _buffer_prefix(self) -> int:
        return self.prefix_size - self.quantized_rows

    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quantized prefix rows, dequantized ``(N', d)`` each (None when nothing is quantized)."""
        if self.encoded is None:
            return None
        keys, values = self.encoded
        dtype, count = self._keys.dtype, self.quantized_rows
        decoded_keys = self.quantizer.decode_keys(keys, self._block_positions(keys.quantized.packed.shape[2]),
                                                  self.rotate, dtype)
        return decoded_keys[0, 0, :count], values.decode().to(dtype)[0, 0, :count]

    def _attention_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self._decoded()
        if decoded is None:
            return self._keys, self._values
        return torch.cat([decoded[0], self._keys]), torch.cat([decoded[1], self._values])

    @property
    def flat_keys(self) -> torch.Tensor:
        return self._attention_buffers()[0][: self.prefix_size]

    @property
    def flat_values(self) -> torch.Tensor:
        return self._attention_buffers()[1][: self.prefix_size]

    def nbytes(self) -> int:
        encoded = 0 if self.encoded is None else sum(part.nbytes() for part in self.encoded)
        return super().nbytes() + encoded

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Reorder the batch (beam search): rebuilt from the reordered rows and quantized again."""
        batch_index = batch_index.to(self._keys.device)
        keys, values, positions, valid = (t.index_select(0, batch_index) for t in self.padded())
        rebuilt = QuantizedRaggedStore.quantize(RaggedStore.from_mask(keys, values, positions, valid), self.quantizer,
                                                self.rotate)
        self.__dict__.update(rebuilt.__dict__)


class QuantizedStorage:
    """Builds a :class:`QuantizedStore` per layer from per-layer quantizers (None: that layer stays dense), or a
    :class:`QuantizedRaggedStore` for a head-wise method."""

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

    def build_ragged(self, layer_idx: int, parts: list[MaskedPart]) -> RaggedStore:
        store = ragged_from_parts(parts)
        quantizer = self.quantizers[layer_idx]
        if quantizer is None:
            return store
        return QuantizedRaggedStore.quantize(store, quantizer, self.layer_rotary(layer_idx))

    def describe(self) -> dict[str, object]:
        return {"storage": "quantized", **self.description}

