"""Test-only stand-in for the ``flash_attn`` package (flash-attn 2.6.3), in plain torch, for machines without CUDA.

It exists so that the ``flash_attention_2`` paths (kvfactory's and transformers 4.44.2's) run in the tests. It has the
two functions transformers imports, with the real signatures and semantics:

- ``flash_attn_func(q, k, v, ...)``: ``q (B, Sq, Hq, d)``, ``k, v (B, Sk, Hk, d)`` with ``Hq % Hk == 0`` (GQA: query
  head ``h`` reads KV head ``h // (Hq // Hk)``), output ``(B, Sq, Hq, d)``;
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``: packed
  ``(total, H, d)`` sequences delimited by int32 cumulative lengths ``(B + 1,)``.

Masking, as in flash-attn >= 2.1: the causal mask is aligned to the bottom-right corner (query ``i`` of ``Sq`` sees
key ``j`` of ``Sk`` iff ``j <= i + Sk - Sq``), and ``window_size=(left, right)`` lets query ``i`` see keys ``j`` with
``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (``-1``: unbounded; ``causal`` sets ``right = 0``). A query that
sees no key gets a zero output and an lse of +inf. ``softcap > 0`` caps the logits at ``softcap·tanh(x / softcap)``.
``return_attn_probs=True`` also returns the fp32 log-sum-exp, ``(B, Hq, Sq)`` (``(Hq, total_q)`` for varlen), and
``None`` in place of the dropout mask.

Differences from the real package, on purpose: it accepts float32 and CPU tensors (the real kernels need fp16/bf16 on
CUDA), computes in fp32 and materializes the ``Sq × Sk`` scores per sequence (fine for test sizes only), and supports
neither dropout nor ALiBi nor a paged KV cache (``block_table``): those raise.
"""
from __future__ import annotations

import math

import torch

__version__ = "2.6.3"
STAND_IN = True  # lets a test tell this module from the real package


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, alibi_slopes: object) -> None:
    if dropout_p:
        raise NotImplementedError("the flash_attn stand-in supports dropout_p=0.0 only (inference)")
    if alibi_slopes is not None:
        raise NotImplementedError("the flash_attn stand-in does not support alibi_slopes")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError("query and key must have the same dtype")
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise RuntimeError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-2] % k.shape[-2]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, causal: bool,
            window_size: tuple[int, int], softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of equal-length sequences: ``q (B, Sq, Hq, d)``, ``k, v (B, Sk, Hk, d)`` → output in q's dtype and
    the fp32 lse ``(B, Hq, Sq)``."""
    batch, sq, hq, head_dim = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    queries = q.float().transpose(1, 2)  # (B, Hq, Sq, d)
    keys = k.float().transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    values = v.float().transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    logits = torch.matmul(queries, keys.transpose(-1, -2)) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    left, right = window_size
    if causal:
        right = 0
    diagonal = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # the key aligned with each query
    slots = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= slots >= diagonal - left
    if right >= 0:
        allowed &= slots <= diagonal + right
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (B, Hq, Sq); -inf where a query sees nothing
    empty = torch.isneginf(lse)
    probabilities = torch.exp(logits - lse.masked_fill(empty, 0.0)[..., None])  # exp(-inf) = 0 on empty rows
    output = torch.matmul(probabilities, values).transpose(1, 2).to(q.dtype)
    return output, lse.masked_fill(empty, float("inf"))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention of ``q (B, Sq, Hq, d)`` over ``k, v (B, Sk, Hk, d)``; see the module docstring."""
    _check(q, k, v, dropout_p, alibi_slopes)
    if q.dim() != 4:
        raise RuntimeError(f"q must be (batch, seqlen, heads, head_dim), got {tuple(q.shape)}")
    output, lse = _attend(q, k, v, softmax_scale, causal, tuple(window_size), softcap)
    return (output, lse, None) if return_attn_probs else output


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention of packed sequences ``q (total_q, Hq, d)`` over ``k, v (total_k, Hk, d)``, sequence ``b`` being rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]`` of each; see the module docstring."""
    _check(q, k, v, dropout_p, alibi_slopes)
    if block_table is not None:
        raise NotImplementedError("the flash_attn stand-in does not support a paged KV cache (block_table)")
    if q.dim() != 3:
        raise RuntimeError(f"q must be (total_q, heads, head_dim), got {tuple(q.shape)}")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have dtype int32")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if starts_q[-1] != q.shape[0] or starts_k[-1] != k.shape[0]:
        raise RuntimeError("cu_seqlens do not end at the packed tensors' lengths")
    if max(b - a for a, b in zip(starts_q, starts_q[1:])) > max_seqlen_q or \
            max(b - a for a, b in zip(starts_k, starts_k[1:])) > max_seqlen_k:
        raise RuntimeError("a sequence is longer than max_seqlen_q / max_seqlen_k")
    output = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in zip(zip(starts_q, starts_q[1:]), zip(starts_k, starts_k[1:])):
        part, part_lse = _attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, causal,
                                 tuple(window_size), softcap)
        output[q0:q1] = part[0]
        lse[:, q0:q1] = part_lse[0]
    return (output, lse, None) if return_attn_probs else output


__all__ = ["flash_attn_func", "flash_attn_varlen_func", "__version__"]
