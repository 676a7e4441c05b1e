"""Quantized pruning (QPruningKV): a token budget read as memory, spent on more tokens at lower precision.

An eviction method's budget ``C`` becomes the bytes of ``C`` 16-bit tokens in a dense store (keys and values at
2 bytes per value plus an int32 position per slot and KV head). :func:`tokens_for_memory` finds the largest token
count whose quantized layer (:meth:`~kvfactory.quant.base.KVQuantizer.stored_nbytes`: packed codes, scales,
zero-points, outliers, low-rank factors, the full-precision residual and positions) fits in those bytes; about
``C·16/nbits``. The quantization wrapper (:class:`~kvfactory.methods.wrappers.Quantized`) applies it per layer
(LayerQuant: layers at different bit-widths keep different counts). Per-slot method state (H2O's scores) costs the
same per token on both sides and is left out of both.
"""
from __future__ import annotations

from functools import lru_cache

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
