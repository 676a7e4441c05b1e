"""Ragged per-head storage: every (sample, KV head) keeps its own number of tokens, with no padding.

Layout of one layer:

- a compact **prefix** (what the head-wise method kept): flat ``keys/values (N, d)`` and ``positions (N,)``, sorted by
  segment ``s = b·Hkv + h`` then position; ``lengths (B, Hkv)`` delimit the segments. Sample ``b``'s segments, one
  after the other, form its *row*;
- a dense **tail** (:class:`~kvfactory.storage.dense.DenseStore`) for tokens appended afterwards: every head gains
  the same tokens, so the tail is compact as well and decoding appends in O(1) amortized.

Attention is exact and costs about ten tensor ops per layer, whatever the number of heads: head ``h``'s queries
meet their sample's whole row in one matmul, the slots of the sample's other heads masked by a bool mask that
:class:`PrefixLayout` derives from the lengths once per prefix (a prefix never changes: decode-time compression and
reordering build a new store); the tail is a dense matmul, and one softmax spans row and tail, so nothing needs
merging. A step computes ``Hkv ×`` (the sample's kept tokens) logits per query row and reads keys and values once:
linear in the kept tokens, ``Hkv`` times the useful logits. For decoding that is far cheaper than a per-token segment
softmax (~25 gather/scatter ops; about 3× slower per SmolLM2 layer on CPU). A batch gathers its rows into a
``(B, L, d)`` temporary each step (``L``: the longest sample's total); one sample reads the flat prefix in place.
It equals dense attention with the evicted positions masked.

``nbytes`` counts every tensor: the per-head lengths and the cached layout (``Hkv`` bools per row slot, plus an
int32 index per row slot for a batch) included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvfactory.attention import AttentionSpec, build_mask
from kvfactory.storage.dense import DenseStore, StoreRow


@dataclass(frozen=True)
class PrefixLayout:
    """Where attention finds each head's prefix tokens, derived from the per-head lengths once per prefix.

    Sample ``b``'s *row* is its segments one after the other (``L`` slots, the longest sample's total):

    - ``index (B·L,)``: the flat slot behind each row slot, or None for a single sample (the flat prefix is the row);
      the slots past a shorter sample's end point at slot 0 and are blocked;
    - ``blocked (B, Hkv, 1, L)`` bool: True where the slot is not head ``h``'s (another head's, or row padding).
    """

    index: torch.Tensor | None
    blocked: torch.Tensor

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, device: torch.device) -> "PrefixLayout":
        per_sample = lengths.sum(dim=-1)
        slots = torch.arange(int(per_sample.max()))
        ends = lengths.cumsum(dim=-1)
        blocked = (slots < (ends - lengths)[..., None]) | (slots >= ends[..., None])
        index = None
        if lengths.shape[0] > 1:
            starts = per_sample.cumsum(dim=0) - per_sample
            index = torch.where(slots < per_sample[:, None], starts[:, None] + slots, 0)
            index = index.flatten().to(device, torch.int32)
        return cls(index, blocked[:, :, None].to(device))

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """A prefix tensor ``(N, ...)`` as rows: itself for one sample, else gathered into ``(B, L, ...)``."""
        if self.index is None:
            return flat
        batch, _, _, slots = self.blocked.shape
        return flat.index_select(0, self.index).view(batch, slots, *flat.shape[1:])

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.index, self.blocked) if t is not None)


class RaggedStore:
    """Keys/values of one layer where each KV head keeps its own number of tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                 tail: DenseStore) -> None:
        self.flat_keys = keys.contiguous()
        self.flat_values = values.contiguous()
        self.flat_positions = positions.to(torch.int32).contiguous()
        self.lengths = lengths  # (B, Hkv) int64, on the CPU
        self.tail = tail
        self.layout = PrefixLayout.from_lengths(lengths, self.flat_keys.device)  # the prefix never changes

    @property
    def segment_ids(self) -> torch.Tensor:
        """The segment ``b·Hkv + h`` of every prefix token, ``(N,)``: derived from the lengths, not stored."""
        device = self.flat_keys.device
        return torch.repeat_interleave(torch.arange(self.lengths.numel(), device=device),
                                       self.lengths.flatten().to(device))

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  keep: torch.Tensor) -> "RaggedStore":
        """Keep ``keys/values (B, Hkv, n, d)`` where ``keep (B, Hkv, n)`` is True (``positions (B, Hkv, n)``)."""
        batch, heads, _, head_dim = keys.shape
        empty = DenseStore(keys.new_zeros(batch, heads, 0, head_dim), keys.new_zeros(batch, heads, 0, head_dim),
                           torch.zeros(batch, heads, 0, dtype=torch.int32, device=keys.device))
        return cls(keys[keep], values[keep], positions[keep], keep.sum(dim=-1).cpu(), empty)

    @classmethod
    def concat(cls, parts: list["RaggedStore"]) -> "RaggedStore":
        """Stack per-sample stores (each with an empty tail) into one batch."""
        tail = DenseStore.from_rows([
            StoreRow(p.tail.keys, p.tail.values, p.tail.positions) for p in parts
        ])
        return cls(torch.cat([p.flat_keys for p in parts]), torch.cat([p.flat_values for p in parts]),
                   torch.cat([p.flat_positions for p in parts]), torch.cat([p.lengths for p in parts]), tail)

    # -- what it holds -----------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Slots of the longest head (prefix + tail)."""
        return int(self.lengths.max()) + self.tail.length

    def head_lengths(self) -> torch.Tensor:
        """Tokens held per (sample, KV head), ``(B, Hkv)``."""
        return self.lengths + self.tail.length

    def kept_per_sample(self) -> list[float]:
        """Mean tokens per KV head of each sample (tail padding not counted)."""
        tail = self.tail.length if self.tail.valid is None else None
        result = []
        for b in range(self.lengths.shape[0]):
            extra = tail if tail is not None else int(self.tail.valid[b].sum())
            result.append(float(self.lengths[b].float().mean()) + extra)
        return result

    def nbytes(self) -> int:
        tensors = [self.flat_keys, self.flat_values, self.flat_positions, self.lengths]
        return sum(t.untyped_storage().nbytes() for t in tensors) + self.layout.nbytes() + self.tail.nbytes()

    def segment_positions(self, b: int, h: int) -> torch.Tensor:
        """Positions held by head ``h`` of sample ``b`` (prefix then tail)."""
        segment = b * self.lengths.shape[1] + h
        start = int(self.lengths.flatten()[:segment].sum())
        prefix = self.flat_positions[start : start + int(self.lengths.flatten()[segment])]
        return torch.cat([prefix, self.tail.positions[b, h]])

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A left-padded dense view ``keys/values (B, Hkv, T, d)``, ``positions (B, Hkv, T)``, ``valid (B, Hkv, T)``
        (prefix then tail per head), for re-applying a head-wise method while decoding."""
        batch, heads = self.lengths.shape
        longest = int(self.lengths.max())
        total = longest + self.tail.length
        device, head_dim = self.flat_keys.device, self.flat_keys.shape[-1]
        keys = self.flat_keys.new_zeros(batch, heads, total, head_dim)
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
        keys[:, :, longest:] = self.tail.keys
        values[:, :, longest:] = self.tail.values
        positions[:, :, longest:] = self.tail.positions
        valid[:, :, longest:] = True if self.tail.valid is None else self.tail.valid[:, None, :]
        return keys, values, positions, valid

    # -- writing -----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        self.tail.append(keys, values, positions, valid)

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Reorder the batch (beam search); the tail is folded into the prefix."""
        batch_index = batch_index.to(self.flat_keys.device)
        keys, values, positions, valid = (t.index_select(0, batch_index) for t in self.padded())
        self.__dict__.update(RaggedStore.from_mask(keys, values, positions, valid).__dict__)

    def truncate(self, length: int) -> None:
        """Drop tail tokens beyond ``length`` slots of the longest head (the prefix is never cut)."""
        self.tail.truncate(max(0, length - int(self.lengths.max())))

    # -- attention ---------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, None]:
        """Attention of the new tokens (the last ``n`` tail slots) over prefix + tail; returns ``(B, Hq, n, d)``."""
        if need_weights:
            raise ValueError("ragged storage does not return attention weights (no head-wise method needs them)")
        batch, num_q_heads, n, head_dim = queries.shape
        heads = self.lengths.shape[1]
        groups, rows = num_q_heads // heads, num_q_heads // heads * n  # query rows per KV head: (group, token)
        grouped = (_fp32(queries) / math.sqrt(head_dim)).reshape(batch, heads, rows, head_dim)
        layout, tail = self.layout, self.tail
        window = spec.sliding_window if query_positions is not None else None

        # prefix: every query row against its sample's whole row, the other heads' slots masked
        keys, values = layout.rows(_fp32(self.flat_keys)), layout.rows(_fp32(self.flat_values))
        slots = keys.shape[-2]
        logits = torch.matmul(grouped.reshape(batch, heads * rows, head_dim), keys.transpose(-1, -2))
        logits = logits.view(batch, heads, rows, slots).masked_fill_(layout.blocked, float("-inf"))
        if window is not None:
            too_far = query_positions[:, :, None] - layout.rows(self.flat_positions).view(batch, 1, slots) >= window
            logits.view(batch, heads, groups, n, slots).masked_fill_(too_far[:, None, None], float("-inf"))

        # tail: dense masked logits (the new tokens are its last n slots)
        tail_logits = torch.matmul(grouped, _fp32(tail.keys).transpose(-1, -2))
        windowed = window is not None
        mask = build_mask(batch, n, tail.length, queries.device, key_valid=tail.valid, query_valid=query_valid,
                          sliding_window=window, query_positions=query_positions if windowed else None,
                          key_positions=tail.positions if windowed else None)
        if mask is None and n > 1:  # plain causality among the new tokens
            mask = torch.ones(n, tail.length, dtype=torch.bool, device=queries.device).tril(tail.length - n)[None, None]
        if mask is not None:
            tail_logits.view(batch, heads, groups, n, tail.length).masked_fill_(~mask[:, :, None], float("-inf"))

        # one softmax over row and tail (every query row sees at least its own token), then both weighted sums
        weights = torch.cat([logits, tail_logits], dim=-1).softmax(dim=-1)
        output = torch.matmul(weights[..., :slots].reshape(batch, heads * rows, slots), values).view_as(grouped)
        output = (output + torch.matmul(weights[..., slots:], _fp32(tail.values))).view(queries.shape)
        return (output if output.dtype == queries.dtype else output.to(queries.dtype)), None


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Attention runs in fp32 (a no-op for fp32 tensors)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()

