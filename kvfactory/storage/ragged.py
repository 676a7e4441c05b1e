"""Ragged per-head storage: every (sample, KV head) keeps its own number of tokens, with no padding.

Layout of one layer: one flat buffer of keys and one of values, ``(N + B·capacity·Hkv, d)``:

- the compact **prefix** (what the head-wise method kept): rows ``[0, N)``, sorted by segment ``s = b·Hkv + h``
  then position, with ``positions (N,)``; ``lengths (B, Hkv)`` delimit the segments. Sample ``b``'s segments, one
  after the other, form its *prefix row*;
- the **tail** of tokens appended afterwards (every head gains the same tokens): sample ``b``'s block of
  ``capacity`` tokens follows the prefix, token-major (token ``t`` of head ``h`` at ``N + (b·capacity + t)·Hkv + h``),
  with ``positions (B, capacity)`` shared by the heads. Appends write into headroom, with the same rule as
  :class:`~kvfactory.storage.dense.DenseStore` (1/16 of the longest head, at least 8 tokens): O(1) amortized.

A sample's *row* is its prefix row followed by its tail; for a single sample that is the buffer itself, so a decode
step copies nothing. Attention is one ``scaled_dot_product_attention`` call, like dense storage's: head ``h``'s
queries meet their sample's whole row (the row expanded over the heads, not copied) under a bool mask that hides
the other heads' slots. :class:`RowLayout` derives that mask (and, for a batch, the index that gathers rows) from
the lengths, once per prefix and tail capacity: a prefix never changes (decode-time compression and reordering
build a new store). A step computes ``Hkv ×`` (the sample's kept tokens) logits per query row and reads keys and
values once: linear in the kept tokens, ``Hkv`` times the useful logits, but one kernel call instead of a dozen
small ops, which on CPU costs about what the dense kernel does (each small op may wake the OpenMP pool). A batch
gathers its rows into a ``(B, L + T·Hkv, d)`` temporary each step (``L``: the longest prefix row); one sample reads
the buffer in place. It equals dense attention with the evicted positions masked.

``nbytes`` counts every tensor: the tail's headroom, the per-head lengths and the layout (``Hkv`` bools per row
slot, plus an int32 index per row slot for a batch) included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvfactory.attention import AttentionSpec
from kvfactory.storage import fused_decode as decode
from kvfactory.storage.dense import headroom


@dataclass
class RowLayout:
    """Where attention finds each head's tokens in its sample's row (``prefix_slots`` + ``tail_capacity·Hkv`` slots).

    - ``allowed (B, Hkv, 1, slots)`` bool: True where the slot is head ``h``'s (not another head's, not row padding,
      not an invalid tail token);
    - ``index (B·slots,)`` int32: the buffer row behind each row slot, or None for a single sample (the buffer is
      the row); the slots past a shorter sample's prefix point at buffer row 0 and are not allowed.
    """

    prefix_slots: int
    tail_capacity: int
    allowed: torch.Tensor
    index: torch.Tensor | None

    @classmethod
    def build(cls, lengths: torch.Tensor, sample_sizes: list[int], tail_capacity: int, device: torch.device,
              tail_valid: torch.Tensor | None = None) -> "RowLayout":
        """The layout of a prefix with ``lengths (B, Hkv)`` (on the CPU) whose per-sample sums are ``sample_sizes``
        (host ints, so that a layout grown while decoding reads nothing back) and room for ``tail_capacity`` tokens
        per sample (``tail_valid (B, tail_capacity)``: which tail tokens are real; None: all)."""
        batch, heads = lengths.shape
        per_sample = lengths.sum(dim=-1)
        prefix_slots = max(sample_sizes, default=0)
        slots = torch.arange(prefix_slots)
        ends = lengths.cumsum(dim=-1)
        prefix_allowed = (slots >= (ends - lengths)[..., None]) & (slots < ends[..., None])
        own_head = torch.eye(heads, dtype=torch.bool)[:, None, :].expand(heads, tail_capacity, heads)
        tail_allowed = own_head.reshape(heads, tail_capacity * heads).expand(batch, -1, -1)
        allowed = torch.cat([prefix_allowed, tail_allowed], dim=-1)[:, :, None].to(device)
        layout = cls(prefix_slots, tail_capacity, allowed, None)
        if tail_valid is not None:
            layout.set_tail_validity(0, tail_valid)
        if batch > 1:
            starts = per_sample.cumsum(dim=0) - per_sample
            prefix_index = torch.where(slots < per_sample[:, None], starts[:, None] + slots, 0)
            tail_index = sum(sample_sizes) + torch.arange(batch * tail_capacity * heads).view(batch, -1)
            layout.index = torch.cat([prefix_index, tail_index], dim=-1).flatten().to(device, torch.int32)
        return layout

    @property
    def slots(self) -> int:
        return self.allowed.shape[-1]

    def set_tail_validity(self, start: int, valid: torch.Tensor) -> None:
        """Tail tokens ``[start, start + n)`` of each sample are visible to their own head iff ``valid (B, n)``."""
        batch, heads = self.allowed.shape[:2]
        tail = self.allowed[:, :, 0, self.prefix_slots :].view(batch, heads, self.tail_capacity, heads)
        own_head = torch.eye(heads, dtype=torch.bool, device=valid.device)[:, None, :]
        tail[:, :, start : start + valid.shape[1]] = own_head & valid[:, None, :, None]

    def rows(self, buffer: torch.Tensor, slots: int) -> torch.Tensor:
        """The first ``slots`` row slots of every sample, ``(B, slots, ...)``: the buffer itself for one sample,
        else gathered."""
        if self.index is None:
            return buffer[None, :slots]
        batch = self.allowed.shape[0]
        index = self.index.view(batch, self.slots)[:, :slots].reshape(-1)
        return buffer.index_select(0, index).view(batch, slots, *buffer.shape[1:])

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.index, self.allowed) if t is not None)


class RaggedStore:
    """Keys/values of one layer where each KV head keeps its own number of tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 lengths: torch.Tensor) -> None:
        """A store holding the prefix ``keys/values (N, d)``, ``positions (N,)`` delimited by ``lengths (B, Hkv)``
        (int64, on the CPU), and an empty tail."""
        self._keys = keys.contiguous()  # prefix rows, then the tail blocks (see the module docstring)
        self._values = values.contiguous()
        self.flat_positions = positions.to(torch.int32).contiguous()
        self.lengths = lengths
        # host copies of what lengths says (read once here, at compression): decoding never reads lengths back
        self._sample_sizes: list[int] = lengths.sum(dim=-1).tolist()
        self._longest: int = int(lengths.max()) if lengths.numel() else 0
        self.prefix_size = keys.shape[0]
        self.tail_length = 0
        self._tail_positions = torch.zeros(lengths.shape[0], 0, dtype=torch.int32, device=keys.device)
        self._tail_valid: torch.Tensor | None = None  # (B, capacity); None while every tail token is real
        self.layout = RowLayout.build(lengths, self._sample_sizes, 0, keys.device)

    @property
    def segment_ids(self) -> torch.Tensor:
        """The segment ``b·Hkv + h`` of every prefix token, ``(N,)``: derived from the lengths, not stored."""
        device = self._keys.device
        return torch.repeat_interleave(torch.arange(self.lengths.numel(), device=device),
                                       self.lengths.flatten().to(device))

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  keep: torch.Tensor) -> "RaggedStore":
        """Keep ``keys/values (B, Hkv, n, d)`` where ``keep (B, Hkv, n)`` is True (``positions (B, Hkv, n)``).

        One host read per compression, the kept counts (ragged buffers are sized by them); the kept rows are then
        gathered with a size known on the host (``nonzero_static``), not by boolean indexing (a read each)."""
        lengths = keep.sum(dim=-1).cpu()
        index = torch.nonzero_static(keep.flatten(), size=int(lengths.sum())).flatten()
        return cls(*(t.flatten(0, 2).index_select(0, index) for t in (keys, values)),
                   positions.flatten().index_select(0, index), lengths)

    @classmethod
    def concat(cls, parts: list["RaggedStore"]) -> "RaggedStore":
        """Stack per-sample stores (each with an empty tail) into one batch."""
        if any(part.tail_length for part in parts):
            raise ValueError("only stores with an empty tail can be stacked into a batch")
        return cls(torch.cat([p.flat_keys for p in parts]), torch.cat([p.flat_values for p in parts]),
                   torch.cat([p.flat_positions for p in parts]), torch.cat([p.lengths for p in parts]))

    # -- what it holds -----------------------------------------------------------------------------------------
    @property
    def flat_keys(self) -> torch.Tensor:
        """The prefix keys ``(N, d)``, segment after segment."""
        return self._keys[: self.prefix_size]

    @property
    def flat_values(self) -> torch.Tensor:
        return self._values[: self.prefix_size]

    @property
    def tail_keys(self) -> torch.Tensor:
        """The appended keys as ``(B, Hkv, T, d)`` (a view)."""
        return self._tail_blocks(self._keys)[:, : self.tail_length].transpose(1, 2)

    @property
    def tail_values(self) -> torch.Tensor:
        return self._tail_blocks(self._values)[:, : self.tail_length].transpose(1, 2)

    @property
    def tail_positions(self) -> torch.Tensor:
        """Positions of the appended tokens, ``(B, T)`` (the same for every head)."""
        return self._tail_positions[:, : self.tail_length]

    @property
    def tail_valid(self) -> torch.Tensor | None:
        """Which appended tokens are real, ``(B, T)``, or None when all are."""
        return None if self._tail_valid is None else self._tail_valid[:, : self.tail_length]

    @property
    def length(self) -> int:
        """Slots of the longest head (prefix + tail)."""
        return self._longest + self.tail_length

    def head_lengths(self) -> torch.Tensor:
        """Tokens held per (sample, KV head), ``(B, Hkv)``."""
        return self.lengths + self.tail_length

    def kept_per_sample(self) -> list[float]:
        """Mean tokens per KV head of each sample (invalid tail tokens not counted)."""
        valid = self.tail_valid
        return [float(self.lengths[b].float().mean()) + (self.tail_length if valid is None else int(valid[b].sum()))
                for b in range(self.lengths.shape[0])]

    def mean_kept(self) -> float:
        """Mean tokens per KV head over the batch (invalid tail tokens not counted)."""
        kept = self.kept_per_sample()
        return sum(kept) / len(kept)

    @property
    def positions(self) -> torch.Tensor:
        """Positions ``(B, Hkv, T)`` of every head's tokens, left-padded with -1 (prefix then tail)."""
        return self.padded()[2]

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded copies of the keys and values, ``(B, Hkv, T, d)`` (for inspection)."""
        keys, values, _, _ = self.padded()
        return keys, values

    kind = "ragged"

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to rebuild this store (``from_state``): the prefix and the tail."""
        tensors = {"keys": self.flat_keys, "values": self.flat_values, "positions": self.flat_positions,
                   "lengths": self.lengths, "tail_keys": self.tail_keys, "tail_values": self.tail_values,
                   "tail_positions": self.tail_positions}
        if self.tail_valid is not None:
            tensors["tail_valid"] = self.tail_valid
        return {name: t.contiguous() for name, t in tensors.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "RaggedStore":
        store = cls(tensors["keys"], tensors["values"], tensors["positions"], tensors["lengths"])
        if tensors["tail_keys"].shape[2]:
            store.append(tensors["tail_keys"], tensors["tail_values"], tensors["tail_positions"],
                         tensors.get("tail_valid"))
        return store

    def snapshot(self) -> Any:
        """The tail length: the prefix never changes, appended tokens are dropped by :meth:`restore`."""
        return self.tail_length

    def restore(self, snapshot: Any) -> None:
        self.tail_length = min(self.tail_length, snapshot)

    def nbytes(self) -> int:
        tensors = [self._keys, self._values, self.flat_positions, self.lengths, self._tail_positions, self._tail_valid]
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None) + self.layout.nbytes()

    def segment_positions(self, b: int, h: int) -> torch.Tensor:
        """Positions held by head ``h`` of sample ``b`` (prefix then tail)."""
        segment = b * self.lengths.shape[1] + h
        start = int(self.lengths.flatten()[:segment].sum())
        prefix = self.flat_positions[start : start + int(self.lengths.flatten()[segment])]
        return torch.cat([prefix, self.tail_positions[b]])

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A left-padded dense view ``keys/values (B, Hkv, T, d)``, ``positions (B, Hkv, T)``, ``valid (B, Hkv, T)``
        (prefix then tail per head), for re-applying a head-wise method while decoding."""
        batch, heads = self.lengths.shape
        longest = self._longest
        total = longest + self.tail_length
        device, head_dim = self._keys.device, self._keys.shape[-1]
        keys = self._keys.new_zeros(batch, heads, total, head_dim)
        values = torch.zeros_like(keys)
        positions = torch.full((batch, heads, total), -1, dtype=torch.int32, device=device)
        valid = torch.zeros(batch, heads, total, dtype=torch.bool, device=device)
        lengths = self.lengths.flatten().to(device)
        starts = torch.cumsum(lengths, 0) - lengths
        segment_ids = self.segment_ids
        rank = torch.arange(segment_ids.numel(), device=device) - starts[segment_ids]
        slot = longest - lengths[segment_ids] + rank
        b, h = segment_ids // heads, segment_ids % heads
        keys[b, h, slot] = self.flat_keys
        values[b, h, slot] = self.flat_values
        positions[b, h, slot] = self.flat_positions
        valid[b, h, slot] = True
        keys[:, :, longest:] = self.tail_keys
        values[:, :, longest:] = self.tail_values
        positions[:, :, longest:] = self.tail_positions[:, None, :]
        valid[:, :, longest:] = True if self.tail_valid is None else self.tail_valid[:, None, :]
        return keys, values, positions, valid

    # -- writing -----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Append ``n`` new tokens to every head (``keys (B, Hkv, n, d)``, ``positions (B, n)``, ``valid (B, n)``)."""
        n = keys.shape[-2]
        start, end = self.tail_length, self.tail_length + n
        if end > self.layout.tail_capacity:
            self._grow_tail(end + headroom(self.length + n))
        self._tail_blocks(self._keys)[:, start:end] = keys.transpose(1, 2)
        self._tail_blocks(self._values)[:, start:end] = values.transpose(1, 2)
        self._tail_positions[:, start:end] = positions
        if valid is not None and self._tail_valid is None and not bool(valid.all()):
            self._tail_valid = torch.ones(self._tail_positions.shape, dtype=torch.bool, device=keys.device)
        if self._tail_valid is not None:  # tail slots may have held invalid tokens before a truncate
            step_valid = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid.to(torch.bool)
            self._tail_valid[:, start:end] = step_valid
            self.layout.set_tail_validity(start, step_valid)
        self.tail_length = end

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Reorder the batch (beam search); the tail is folded into the prefix."""
        batch_index = batch_index.to(self._keys.device)
        keys, values, positions, valid = (t.index_select(0, batch_index) for t in self.padded())
        self.__dict__.update(RaggedStore.from_mask(keys, values, positions, valid).__dict__)

    def truncate(self, length: int) -> None:
        """Drop tail tokens beyond ``length`` slots of the longest head (the prefix is never cut)."""
        self.tail_length = min(self.tail_length, max(0, length - self._longest))

    @property
    def _buffer_prefix(self) -> int:
        """Prefix rows held in the full-precision buffers before the tail (all of them here; a quantized subclass
        holds fewer)."""
        return self.prefix_size

    def _attention_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every row slot, prefix then tail, in full precision."""
        return self._keys, self._values

    def _tail_blocks(self, buffer: torch.Tensor) -> torch.Tensor:
        """The tail part of a buffer as ``(B, capacity, Hkv, d)`` (a view)."""
        batch, heads = self.lengths.shape
        return buffer[self._buffer_prefix :].view(batch, self.layout.tail_capacity, heads, buffer.shape[-1])

    def _grow_tail(self, capacity: int) -> None:
        """Re-allocate the buffers with room for ``capacity`` tail tokens per sample (the contents are kept)."""
        batch, heads = self.lengths.shape

        def grown(buffer: torch.Tensor) -> torch.Tensor:
            kept = self._buffer_prefix
            bigger = buffer.new_zeros(kept + batch * capacity * heads, buffer.shape[-1])
            bigger[:kept] = buffer[:kept]
            bigger[kept:].view(batch, capacity, heads, -1)[:, : self.tail_length] = (
                self._tail_blocks(buffer)[:, : self.tail_length])
            return bigger

        def widened(tensor: torch.Tensor, fill: int | bool) -> torch.Tensor:
            wider = torch.full((batch, capacity), fill, dtype=tensor.dtype, device=tensor.device)
            wider[:, : self.tail_length] = tensor[:, : self.tail_length]
            return wider

        self._keys, self._values = grown(self._keys), grown(self._values)
        self._tail_positions = widened(self._tail_positions, -1)
        if self._tail_valid is not None:
            self._tail_valid = widened(self._tail_valid, True)
        self.layout = RowLayout.build(self.lengths, self._sample_sizes, capacity, self._keys.device, self._tail_valid)

    # -- attention ---------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, None]:
        """Attention of the new tokens (the last ``n`` tail tokens) over prefix + tail; returns ``(B, Hq, n, d)``."""
        if need_weights:
            raise ValueError("ragged storage does not return attention weights (no head-wise method needs them)")
        fused = decode.ragged_store_attend(self, queries, spec, query_valid, need_weights)
        if fused is not None:  # each (sample, KV head) reads only its own slots
            return fused, None
        batch, num_q_heads, n, head_dim = queries.shape
        heads = self.lengths.shape[1]
        slots = self.layout.prefix_slots + self.tail_length * heads
        keys, values = (self.layout.rows(buffer, slots)[:, None].expand(-1, heads, -1, -1)
                        for buffer in self._attention_buffers())
        mask = self._row_mask(n, num_q_heads // heads, slots, spec, query_valid, query_positions)
        grouped = queries.reshape(batch, heads, num_q_heads // heads * n, head_dim)  # rows: (group, token)
        output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return output.view(batch, num_q_heads, n, head_dim), None

    def _row_mask(self, n: int, groups: int, slots: int, spec: AttentionSpec, query_valid: torch.Tensor | None,
                  query_positions: torch.Tensor | None) -> torch.Tensor:
        """Which row slots each query row sees: ``(B, Hkv, 1 or groups·n, slots)`` bool.

        Beyond the layout (own head only): causality among the ``n`` new tokens, the sliding window by position,
        and padded query rows, which see everything so that they stay finite (their outputs are never used)."""
        visible = self.layout.allowed[..., :slots]
        window = spec.sliding_window if query_positions is not None else None
        if n == 1 and window is None and query_valid is None:  # decoding: the layout alone
            return visible
        visible = visible[:, :, :, None]  # (B, Hkv, 1, 1, slots): (group, token) rows
        row_slots = torch.arange(slots, device=visible.device)
        if n > 1:  # new token i is tail token T - n + i: it sees the prefix and the tail up to itself
            tokens = self.tail_length - n + 1 + torch.arange(n, device=visible.device)
            visible = visible & (row_slots < self.layout.prefix_slots + tokens[:, None] * visible.shape[1])
        if window is not None:
            near = query_positions[:, :, None] - self._row_positions(slots)[:, None, :] < window  # (B, n, slots)
            visible = visible & near[:, None, None]
        if query_valid is not None:
            visible = visible | ~query_valid[:, None, None, :, None]
        batch, heads = visible.shape[:2]
        if visible.shape[3] == 1:
            return visible[:, :, :, 0]
        return visible.expand(batch, heads, groups, n, slots).reshape(batch, heads, groups * n, slots)

    def _row_positions(self, slots: int) -> torch.Tensor:
        """The position held by each of the first ``slots`` row slots, ``(B, slots)`` (row padding: any)."""
        heads = self.lengths.shape[1]
        prefix = self.layout.rows(self.flat_positions, self.layout.prefix_slots)
        tail = self.tail_positions.repeat_interleave(heads, dim=1)
        return torch.cat([prefix, tail], dim=1)[:, :slots]
