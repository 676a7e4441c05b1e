"""Quantized pruning (QPruningKV): a token budget read as memory, spent on more tokens at lower precision.

An eviction method's budget ``C`` becomes the bytes of ``C`` 16-bit tokens in a dense store (keys and values at
2 bytes per value plus an int32 position per slot and KV head). :func:`tokens_for_memory` finds the largest token
count whose quantized layer (:meth:`~kvfactory.quant.base.KVQuantizer.stored_nbytes`: packed codes, scales,
zero-points, outliers, low-rank factors, the full-precision residual and positions) fits in those bytes; about
``C·16/nbits``. :class:`MemoryBudget` wraps the method so that each layer keeps its own count (LayerQuant: layers at
different bit-widths keep different counts). Per-slot method state (H2O's scores) costs the same per token on both
sides and is left out of both.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch

from kvfactory.methods.base import Compressor, Kept
from kvfactory.quant.base import POSITION_BYTES, KVQuantizer

BUDGET_BITS = 16


def dense_nbytes(tokens: int, heads: int, head_dim: int, value_bits: int = BUDGET_BITS) -> int:
    """Bytes of ``tokens`` slots of one sample's layer in a dense store at ``value_bits`` per value."""
    return tokens * heads * (2 * head_dim * value_bits // 8 + POSITION_BYTES)


def tokens_for_memory(capacity: int, quantizer: KVQuantizer | None, heads: int, head_dim: int,
                      dtype_bytes: int) -> int:
    """The most tokens ``quantizer`` can hold in the memory of ``capacity`` 16-bit tokens (``capacity`` itself
    for a full-precision layer, ``quantizer`` None)."""
    if quantizer is None:
        return capacity
    return _tokens_for_memory(capacity, quantizer, heads, head_dim, dtype_bytes)


@lru_cache(maxsize=4096)
def _tokens_for_memory(capacity: int, quantizer: KVQuantizer, heads: int, head_dim: int, dtype_bytes: int) -> int:
    budget = dense_nbytes(capacity, heads, head_dim)
    floor_per_token = heads * (2 * head_dim * quantizer.nbits / 8 + POSITION_BYTES)
    upper = int(budget // floor_per_token) + 1
    # bytes are not monotone in tokens (a whole group quantized costs less than its tokens in the residual): scan
    fitting = [t for t in range(1, upper + 1) if quantizer.stored_nbytes(t, heads, head_dim, dtype_bytes) <= budget]
    if not fitting:
        raise ValueError(f"{quantizer.name}: not even one token fits in the memory of {capacity} 16-bit tokens")
    return max(fitting)


class MemoryBudget:
    """A compressor whose per-layer capacity is converted from 16-bit tokens to quantized tokens of equal bytes.

    Everything but ``capacity`` / ``compress_tokens`` / ``compress`` is the wrapped method's (parameters,
    decode-time budgets, windows); a decode budget is converted the same way.
    """

    def __init__(self, method: Compressor, tokens_for: Callable[[int, int], int]) -> None:
        self.method = method
        self.tokens_for = tokens_for  # (layer_idx, capacity in 16-bit tokens) -> quantized tokens

    def __getattr__(self, name: str) -> Any:
        if name == "method":  # not set yet (copy, unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.method, name)

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        tokens = self.method.capacity(layer_idx, num_layers, seq_len, budget)
        return tokens if tokens >= seq_len else self.tokens_for(layer_idx, tokens)

    def compress_tokens(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                        num_layers: int = 1, capacity: int | None = None, **kwargs: Any) -> Kept:
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, keys.shape[-2])
        return self.method.compress_tokens(queries, keys, values, layer_idx=layer_idx, num_layers=num_layers,
                                           capacity=capacity, **kwargs)

    compress = Compressor.compress

    def describe(self) -> dict[str, object]:
        return {**self.method.describe(), "quant_pruning": True}

    def __repr__(self) -> str:
        return f"MemoryBudget({self.method!r})"
