"""Decode attention straight from compressed stores: when the fused C++ kernels apply, and the fallbacks.

:func:`quantized_store_attend` serves :meth:`QuantizedStore.attend <kvfactory.storage.quantized.QuantizedStore.attend>`
and :func:`ragged_store_attend` serves :meth:`RaggedStore.attend <kvfactory.storage.ragged.RaggedStore.attend>`;
each returns the attention output, or None when its kernel does not cover the case and the store's own path
(dequantize then sdpa; one masked sdpa over the sample's row) must run. Covered:

- **KIVI** (and LayerQuant, whose layers are KIVI): per-channel keys, per-token values, 2/4/8 bits, any key group,
  value groups that are a multiple of the codes per byte, fp16 or fp32 scales, with the residual, padding
  (``valid``) and causality among up to :data:`MAX_NEW_TOKENS` new tokens.
- **Not covered, by design** (the dequantize-then-attend path runs):

  - **KVQuant** quantizes keys *before* RoPE: a key's logit would need the query rotated back by each key's own
    position (a per-token rotation of the query: as much work as dequantizing and rotating the key) and the
    model's RoPE variant inside the kernel; its **sparse outliers** replace single codes with exact values, a
    scattered correction both to the logits and to the weighted values.
  - **GEAR** adds a low-rank error term ``L·R`` and sparse outliers: the low-rank part would fit (``q·Rᵀ`` per
    head, then ``L`` per token, ``pᵀL·R`` for the values), but GEAR always carries outliers too, the same scattered
    correction as KVQuant.
  - the quantized ragged store (one block over all heads' segments: per-segment key groups do not align with
    heads), a sliding window, padded query rows, attention weights asked for, more than
    :data:`MAX_NEW_TOKENS` new tokens (a prefill chunk: sdpa's blocked kernel is the better tool), non-CPU
    tensors other than CUDA ones, and CUDA without ``triton``.

On CUDA tensors, with ``KVFACTORY_TRITON_DECODE=1`` (opt-in: validated in Triton's CPU interpreter only, untested on a
GPU), the same entry points run the Triton kernels of :mod:`kvfactory.kernels.triton_decode`.

``KVFACTORY_NO_CPP_KERNELS=1`` (or a failed build) turns both kernels off: the stores' pure-PyTorch paths run.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from kvfactory import kernels
from kvfactory.kernels import triton_decode
from kvfactory.attention import AttentionSpec

# The Triton kernels are untested on a GPU: CUDA decoding uses them only when this variable is 1.
TRITON_VARIABLE = "KVFACTORY_TRITON_DECODE"
MAX_NEW_TOKENS = 16  # beyond this many query tokens a step is a prefill chunk: the sdpa path runs


def _plain_decode(queries: torch.Tensor, spec: AttentionSpec, query_valid: torch.Tensor | None,
                  need_weights: bool) -> bool:
    """The cases both kernels cover, whatever the store (cheap checks; the build is checked last)."""
    return (queries.device.type in ("cpu", "cuda") and not need_weights and queries.shape[2] <= MAX_NEW_TOKENS
            and spec.sliding_window is None and (query_valid is None or bool(query_valid.all())))


def _backend(queries: torch.Tensor) -> Any:
    """The module whose kernels run on the queries' device (the C++ kernels on CPU, Triton on CUDA), or None."""
    if queries.device.type == "cpu":
        return kernels if kernels.decode_kernels_available() else None
    opted_in = os.environ.get(TRITON_VARIABLE, "0") not in ("", "0")
    return triton_decode if opted_in and kernels.cpp_kernels_enabled() and triton_decode.triton_available() else None


def quantized_fusable(store: Any) -> bool:
    """Whether the quantizer and the blocks are what the fused kernel reads (KIVI's layout, no extra terms)."""
    quantizer = store.quantizer
    if quantizer.pre_rope or quantizer.sparse_ratio() > 0 or quantizer.error_rank():
        return False
    if (quantizer.key_layout, quantizer.value_layout) != ("channel", "token"):
        return False
    head_dim = store.residual.head_dim
    per_byte = 8 // quantizer.nbits
    return head_dim % per_byte == 0 and quantizer.value_group(head_dim) % per_byte == 0 and all(
        block.keys.outliers is None and block.keys.low_rank is None and block.values.outliers is None
        and block.values.low_rank is None for block in store.blocks)


def quantized_store_attend(store: Any, queries: torch.Tensor, spec: AttentionSpec,
                           query_valid: torch.Tensor | None, need_weights: bool) -> torch.Tensor | None:
    """The fused attention of the new tokens over ``store`` (``(B, Hq, nq, d)`` in the queries' dtype), or None."""
    if not (_plain_decode(queries, spec, query_valid, need_weights) and quantized_fusable(store)):
        return None
    residual, quantizer = store.residual, store.quantizer
    if residual.length < queries.shape[2] or (queries.device.type == "cuda" and not triton_decode.supports_triton(
            queries.shape[-1], quantizer.q_group_size)):
        return None
    backend = _backend(queries)
    if backend is None:
        return None
    blocks = [(b.keys.quantized.packed, b.keys.quantized.scale, b.keys.quantized.zero, b.values.quantized.packed,
               b.values.quantized.scale, b.values.quantized.zero, b.valid) for b in store.blocks]
    output = backend.quantized_decode_attention(
        _fp32(queries), blocks, _fp32(residual.keys), _fp32(residual.values),
        residual.valid, quantizer.nbits, quantizer.q_group_size, quantizer.value_group(queries.shape[-1]))
    return output if output.dtype == queries.dtype else output.to(queries.dtype)


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 (itself when it is: a decode step calls this per layer, and ``.float()`` is a dispatch)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def ragged_store_attend(store: Any, queries: torch.Tensor, spec: AttentionSpec,
                        query_valid: torch.Tensor | None, need_weights: bool) -> torch.Tensor | None:
    """Attention of the new tokens over a ragged store with each (sample, KV head) reading only its own slots, or
    None (fp32 buffers only: converting the whole buffer each step would cost more than the masked sdpa saves)."""
    if not (_plain_decode(queries, spec, query_valid, need_weights) and store.tail_length >= queries.shape[2]):
        return None
    keys, values = store._attention_buffers()
    if keys.dtype != torch.float32 or (queries.device.type == "cuda" and not triton_decode.supports_triton(
            queries.shape[-1], triton_decode.BLOCK_TOKENS)):
        return None
    backend = _backend(queries)
    if backend is None:
        return None
    output = backend.ragged_decode_attention(_fp32(queries), keys, values, store.lengths, store.prefix_size,
                                             store.layout.tail_capacity, store.tail_length, store.tail_valid)
    return output if output.dtype == queries.dtype else output.to(queries.dtype)
