"""StreamingLLM: attention sinks plus a recent window."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import BudgetedCompressor, Selection
from kvfactory.methods.merging import merge_evicted


@dataclass(kw_only=True)
class StreamingLLM(BudgetedCompressor):
    """Keeps the first ``sink_size`` tokens and the last ``C - sink_size`` (Xiao et al. 2023,
    "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453).

    No scores. With ``decode_budget`` the window rolls while generating. By default keys keep their original
    positions (no re-rotation to cache-relative positions): the same choice as KVCache-Factory and kvpress. With
    ``position_shift=True`` attention uses positions *inside the cache*, as in the StreamingLLM paper: slot ``i`` holds
    a key rotated at position ``i`` (the kept keys are re-rotated after every eviction, new tokens are rotated to
    their slot), so a model streams far past its ``max_position_embeddings``.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, sinks included. KVCache-Factory's LongBench/RULER runners use ``window_size = C - 4``, i.e. 4 sinks.
    sink_size:
        Initial tokens always kept (default 4).
    merge:
        ``None`` (drop), ``"pivot"`` or ``"weighted"``: fold evicted middle tokens into the most similar kept token.
    position_shift:
        Positions inside the cache (default False; RoPE models, unpadded batches).
    """

    name = "streamingllm"
    sink_size: int = 4
    merge: str | None = None
    position_shift: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sink_size, int) or self.sink_size < 0:
            raise ValueError(f"streamingllm: sink_size must be a non-negative integer, got {self.sink_size!r}")
        if self.merge is not None and self.merge not in ("pivot", "weighted"):
            raise ValueError(f"streamingllm: merge must be one of ('pivot', 'weighted') or None, got {self.merge!r}")
        super().__post_init__()

    def min_capacity(self) -> int:
        return self.sink_size + 1

    def min_capacity_reason(self) -> str:
        return f"larger than sink_size={self.sink_size}"

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        batch, heads, n, _ = keys.shape
        recent = capacity - self.sink_size
        positions = torch.cat([torch.arange(self.sink_size), torch.arange(n - recent, n)]).to(keys.device)
        return Selection(positions.expand(batch, heads, capacity))

    def kept_key_values(self, queries, keys, values, selection, layer_idx):
        if self.merge is None:
            return super().kept_key_values(queries, keys, values, selection, layer_idx)
        return merge_evicted(keys, values, selection.indices, 0, self.merge)
