"""Ragged per-head storage: every (sample, KV head) keeps its own number of tokens, with no padding.

Layout of one layer:

- a compact **prefix** (what the head-wise method kept): flat ``keys/values (N, d)`` and ``positions (N,)``, sorted by
  segment ``s = b·Hkv + h`` then position; ``lengths (B, Hkv)`` delimit the segments;
- a dense **tail** (:class:`~kvfactory.storage.dense.DenseStore`) for tokens appended afterwards: every head gains
  the same tokens, so the tail is compact as well and decoding appends in O(1) amortized.

Attention is exact: a segment softmax over the prefix (scatter-max, exp, scatter-add, all vectorized, cost linear
in the kept tokens) merged with dense attention over the tail through their log-sum-exps; it equals dense attention
with the evicted positions masked. ``nbytes`` counts every tensor, the per-head lengths included.
"""
from __future__ import annotations

import math

import torch

from kvfactory.attention import AttentionSpec, build_mask
from kvfactory.storage.dense import DenseStore, StoreRow


class RaggedStore:
    """Keys/values of one layer where each KV head keeps its own number of tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                 tail: DenseStore) -> None:
        self.flat_keys = keys.contiguous()
        self.flat_values = values.contiguous()
        self.flat_positions = positions.to(torch.int32).contiguous()
        self.lengths = lengths  # (B, Hkv) int64, on the CPU
        self.tail = tail

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
        return sum(t.untyped_storage().nbytes() for t in tensors) + self.tail.nbytes()

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
        num_kv_heads = self.lengths.shape[1]
        groups = num_q_heads // num_kv_heads
        scale = 1 / math.sqrt(head_dim)
        grouped = queries.reshape(batch * num_kv_heads, groups * n, head_dim).float()
        segment_ids = self.segment_ids

        # prefix: per-token logits against its own segment's queries, segment softmax statistics
        logits = torch.bmm(grouped[segment_ids], self.flat_keys.float()[:, :, None]).squeeze(-1) * scale
        if spec.sliding_window is not None and query_positions is not None:
            query_pos = query_positions.repeat_interleave(num_kv_heads, dim=0).repeat(1, groups)  # (S, g·n)
            too_far = query_pos[segment_ids] - self.flat_positions[:, None] >= spec.sliding_window
            logits = logits.masked_fill(too_far, float("-inf"))
        segments = batch * num_kv_heads
        prefix_max = torch.full((segments, groups * n), float("-inf"), device=queries.device)
        prefix_max = prefix_max.scatter_reduce(0, segment_ids[:, None].expand_as(logits), logits, "amax")
        safe_max = torch.where(torch.isfinite(prefix_max), prefix_max, torch.zeros_like(prefix_max))
        weights = torch.exp(logits - safe_max[segment_ids])
        prefix_sum = torch.zeros_like(prefix_max).index_add_(0, segment_ids, weights)
        prefix_out = torch.zeros(segments, groups * n, head_dim, device=queries.device).index_add_(
            0, segment_ids, weights[:, :, None] * self.flat_values.float()[:, None, :]
        )

        # tail: dense masked logits (the new tokens are its last n slots)
        tail = self.tail
        tail_logits = torch.matmul(grouped.view(batch, num_kv_heads, groups * n, head_dim),
                                   tail.keys.float().transpose(-1, -2)) * scale
        mask = build_mask(batch, n, tail.length, queries.device, key_valid=tail.valid, query_valid=query_valid,
                          sliding_window=spec.sliding_window, query_positions=query_positions,
                          key_positions=tail.positions)
        if mask is None and n > 1:  # plain causality among the new tokens
            mask = torch.ones(n, tail.length, dtype=torch.bool, device=queries.device).tril(tail.length - n)[None, None]
        tail_logits = tail_logits.view(batch, num_kv_heads, groups, n, tail.length)
        if mask is not None:
            tail_logits = tail_logits.masked_fill(~mask[:, :, None], float("-inf"))
        tail_logits = tail_logits.view(segments, groups * n, tail.length)
        tail_max = tail_logits.amax(dim=-1)
        safe_tail = torch.where(torch.isfinite(tail_max), tail_max, torch.zeros_like(tail_max))
        tail_weights = torch.exp(tail_logits - safe_tail[..., None])
        tail_sum = tail_weights.sum(-1)
        tail_out = torch.matmul(tail_weights.view(batch, num_kv_heads, groups * n, tail.length),
                                tail.values.float()).view(segments, groups * n, head_dim)

        # merge the two parts through their maxima
        total_max = torch.maximum(safe_max, safe_tail)
        prefix_scale = torch.exp(safe_max - total_max) * torch.isfinite(prefix_max)
        tail_scale = torch.exp(safe_tail - total_max) * torch.isfinite(tail_max)
        numerator = prefix_out * prefix_scale[..., None] + tail_out * tail_scale[..., None]
        denominator = prefix_sum * prefix_scale + tail_sum * tail_scale
        output = (numerator / denominator[..., None]).to(queries.dtype)
        return output.view(batch, num_q_heads, n, head_dim), None
