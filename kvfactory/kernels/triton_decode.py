"""The GPU path of the fused decode kernels, in Triton: attention over KIVI's packed codes and ragged decode
attention, with the C++ kernels' signatures (:func:`kvfactory.kernels.quantized_decode_attention`,
:func:`kvfactory.kernels.ragged_decode_attention`).

Each Triton program attends one query row (sample, query head, new token) to one *source*: a quantized block (the
codes of a tile of tokens are loaded as bytes, each channel shifted out of its byte and dequantized in registers:
no dequantized cache is written), a dense run of rows (the full-precision residual; a ragged store's prefix
segment, one per (sample, KV head); its tail, rows ``Hkv`` apart). A program returns its online-softmax state
(max, sum, unnormalized output) and the sources are merged in PyTorch, as flash-decoding merges its splits.

Status: **validated only in Triton's CPU interpreter** (``TRITON_INTERPRET=1``, tests/test_decode_kernels.py),
against the same references as the C++ kernels; never run on a GPU here (no GPU in CI). :mod:`kvfactory.kernels.decode`
calls it for CUDA tensors when ``triton`` imports and ``KVFACTORY_TRITON_DECODE=1`` (opt-in until checked on a GPU;
``benchmarks/gpu_check.sh`` run with that variable set times it there).
``triton`` is optional: nothing imports it unless a CUDA decode step (or the interpreter test) asks.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch

BLOCK_TOKENS = 32  # tokens per tile (a divisor of every key group kvfactory accepts here: see supports_triton)


def triton_available() -> bool:
    """Whether the optional ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    """The jitted kernels, built on first use (``TRITON_INTERPRET`` is read then)."""
    import importlib

    module = importlib.import_module("kvfactory.kernels._triton_kernels")
    return module.quantized_partial, module.dense_partial


def supports_triton(head_dim: int, key_group: int) -> bool:
    """Power-of-two head dims (``tl.arange``) and key groups that are whole tiles."""
    return head_dim & (head_dim - 1) == 0 and key_group % BLOCK_TOKENS == 0


def _partials(rows: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, device=device), torch.empty(rows, device=device),
            torch.empty(rows, head_dim, device=device))


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shape: torch.Size) -> torch.Tensor:
    """Flash-decoding's merge of per-source softmax states into the attention output."""
    best = torch.stack([m for m, _, _ in parts])  # (S, rows)
    top = best.amax(0)
    weights = torch.exp(best - top.masked_fill(top == float("-inf"), 0.0)).nan_to_num(0.0)
    total = sum(w * l for w, (_, l, _) in zip(weights, parts))
    acc = sum(w[:, None] * a for w, (_, _, a) in zip(weights, parts))
    return (acc / total[:, None]).view(shape)


def _dense(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
           lengths: torch.Tensor, row_stride: int, valid: torch.Tensor | None, causal: bool, num_kv_heads: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, dense_partial = _kernels()
    batch, num_q_heads, nq, head_dim = query.shape
    rows = batch * num_q_heads * nq
    m, l, acc = _partials(rows, head_dim, query.device)
    valid_arg = valid.to(torch.int8).contiguous() if valid is not None else m
    dense_partial[(rows,)](query, keys, values, starts, lengths, valid_arg, m, l, acc, num_kv_heads,
                           num_q_heads // num_kv_heads, nq, row_stride, 0 if valid is None else valid.shape[1],
                           CAUSAL=causal, HAS_VALID=valid is not None, D=head_dim, BLOCK_N=BLOCK_TOKENS)
    return m, l, acc


def quantized_decode_attention(query: torch.Tensor, blocks: list[tuple[torch.Tensor, ...]],
                               residual_keys: torch.Tensor, residual_values: torch.Tensor,
                               residual_valid: torch.Tensor | None, nbits: int, key_group: int,
                               value_group: int) -> torch.Tensor:
    """As :func:`kvfactory.kernels.quantized_decode_attention`, with Triton (queries ``(B, Hq, nq, d)``)."""
    quantized_partial, _ = _kernels()
    batch, num_q_heads, nq, head_dim = query.shape
    num_kv_heads, residual = residual_keys.shape[1], residual_keys.shape[2]
    scaled = (query.float() / math.sqrt(head_dim)).contiguous()
    rows = batch * num_q_heads * nq
    parts = []
    for key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, valid in blocks:
        m, l, acc = _partials(rows, head_dim, query.device)
        quantized_partial[(rows,)](
            scaled, key_codes, key_scale.contiguous(), key_zero.contiguous(), value_codes, value_scale.contiguous(),
            value_zero.contiguous(), valid.to(torch.int8).contiguous() if valid is not None else m, m, l, acc,
            key_codes.shape[2], num_kv_heads, num_q_heads // num_kv_heads, nq, HAS_VALID=valid is not None,
            D=head_dim, NBITS=nbits, KEY_GROUP=key_group, VALUE_GROUP=value_group, BLOCK_N=BLOCK_TOKENS)
        parts.append((m, l, acc))
    if residual:
        problems = batch * num_kv_heads
        starts = torch.arange(problems, device=query.device, dtype=torch.int64) * residual * head_dim
        lengths = torch.full((problems,), residual, device=query.device, dtype=torch.int64)
        parts.append(_dense(scaled, residual_keys.float().contiguous(), residual_values.float().contiguous(),
                            starts, lengths, head_dim, residual_valid, True, num_kv_heads))
    return _merge(parts, query.shape)


def ragged_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            prefix_rows: int, tail_capacity: int, tail_length: int,
                            tail_valid: torch.Tensor | None) -> torch.Tensor:
    """As :func:`kvfactory.kernels.ragged_decode_attention`, with Triton."""
    batch, num_kv_heads = lengths.shape
    head_dim = query.shape[-1]
    scaled = (query.float() / math.sqrt(head_dim)).contiguous()
    flat = lengths.flatten().to(query.device, torch.int64)
    prefix = _dense(scaled, keys, values, (flat.cumsum(0) - flat) * head_dim, flat, head_dim, None, False,
                    num_kv_heads)
    problem = torch.arange(batch * num_kv_heads, device=query.device, dtype=torch.int64)
    tail_rows = prefix_rows + (problem // num_kv_heads) * tail_capacity * num_kv_heads + problem % num_kv_heads
    tail = _dense(scaled, keys, values, tail_rows * head_dim, torch.full_like(flat, tail_length),
                  num_kv_heads * head_dim, tail_valid, True, num_kv_heads)
    return _merge([prefix, tail], query.shape)
