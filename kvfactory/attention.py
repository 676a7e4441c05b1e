"""The one attention function every patched layer calls: eager, sdpa or flash, GQA-native, with kvfactory's masks.

Keys and values arrive at KV-head granularity ``(B, Hkv, T, d)`` and are never repeated to the query heads: eager
groups the queries ``(B, Hkv, g·n, d)``, sdpa uses ``enable_gqa``, flash-attn handles GQA natively.

Masks are built here, not taken from transformers: the model's own mask describes the *logical* sequence, while the
cache holds a *physical* subset of it. The new ``n`` queries are always the last ``n`` slots of the keys, so

- causality is by slot: query ``i`` sees slot ``j`` iff ``j <= T - n + i``;
- padding is a per-slot validity mask ``(B, T)`` kept by the cache (padded query rows attend everywhere, so they stay
  finite; their outputs are never used);
- a sliding window (Mistral) is by position: query at position ``p`` sees a key at ``q`` iff ``p - q < window``.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvfactory import kernels

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def flash_attn_available() -> bool:
    """Whether the optional ``flash_attn`` package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


@dataclass(frozen=True)
class AttentionSpec:
    """How a model attends: the implementation it was loaded with and its sliding window (None: full attention)."""

    implementation: str
    sliding_window: int | None = None


def grouped_logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``queries·keysᵀ/√d`` per query head, as ``(B, Hkv, g, n_q, n)`` in the inputs' dtype."""
    batch, num_q_heads, n_q, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    groups = num_q_heads // num_kv_heads
    grouped = queries.reshape(batch, num_kv_heads, groups * n_q, head_dim)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)) / math.sqrt(head_dim)
    return logits.view(batch, num_kv_heads, groups, n_q, keys.shape[-2])


def build_mask(
    batch: int,
    n: int,
    total: int,
    device: torch.device,
    *,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask ``(B, 1 or Hkv, n, T)`` (True = attend), or None when nothing needs masking.

    Plain causality alone (``n == T``) also returns None; callers then use their causal fast path.
    ``key_positions`` is ``(B, Hkv, T)`` and ``query_positions`` ``(B, n)``: only needed for a sliding window.
    """
    if query_positions is not None:
        query_positions = query_positions[:, None, :]  # (B, 1, n): broadcast over KV heads
    window_mask = None
    if sliding_window is not None and query_positions is not None and key_positions is not None:
        distance = query_positions[..., :, None] - key_positions[:, :, None, :].to(query_positions.dtype)
        if bool((distance >= sliding_window).any()):
            window_mask = distance < sliding_window
    causal_is_trivial = n == 1 or n == total  # nothing to mask, or the implementations' own causal fast path
    if key_valid is None and query_valid is None and window_mask is None and causal_is_trivial:
        return None
    slots = torch.arange(total, device=device)
    mask = (slots[None, :] <= (total - n + torch.arange(n, device=device))[:, None]).expand(batch, 1, n, total)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if window_mask is not None:
        mask = mask & window_mask
    if query_valid is not None:
        mask = mask | ~query_valid[:, None, :, None]
    return mask


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    spec: AttentionSpec,
    *,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    need_weights: bool = False,
    need_lse: bool = False,
    need_column_sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of the last ``n`` tokens ``queries (B, Hq, n, d)`` over ``keys/values (B, Hkv, T, d)``.

    Returns the output ``(B, Hq, n, d)`` and, when ``need_weights``, the fp32 attention weights
    ``(B, Hkv, g, n, T)`` (computed on the eager path, whatever the implementation); when ``need_lse`` and the
    sdpa kernel can give it (CPU), each query's log-sum-exp ``(B, Hq, n)`` fp32, else None. When
    ``need_column_sums`` on sdpa and the fused C++ kernel handles the case (CPU, a plain causal prefill: no mask),
    the second result is instead the column sums of the attention weights ``(B, Hkv, g, n)`` fp32, computed in the
    same pass as the output (:mod:`kvfactory.kernels`); otherwise ``need_column_sums`` asks for nothing.
    """
    batch, num_q_heads, n, head_dim = queries.shape
    num_kv_heads, total = keys.shape[1], keys.shape[-2]
    mask = build_mask(
        batch, n, total, keys.device, key_valid=key_valid, query_valid=query_valid,
        sliding_window=spec.sliding_window, query_positions=query_positions, key_positions=key_positions,
    )
    is_causal = mask is None and n > 1
    if need_weights or spec.implementation == "eager":
        return _eager(queries, keys, values, mask, is_causal)
    if spec.implementation == "flash_attention_2" and mask is None:
        return _flash(queries, keys, values, is_causal), None
    if need_column_sums and spec.implementation == "sdpa" and mask is None and _fused_column_sums(queries, keys):
        output, column_sums = kernels.causal_attention_column_sums(queries, keys, values)
        return output, column_sums.view(batch, num_kv_heads, num_q_heads // num_kv_heads, n)
    if need_lse and spec.implementation == "sdpa" and queries.device.type == "cpu":
        return _sdpa_with_lse_cpu(queries, keys, values, mask, is_causal)
    if mask is not None and mask.shape[1] > 1 and num_q_heads != num_kv_heads:
        mask = mask.repeat_interleave(num_q_heads // num_kv_heads, dim=1)
    output = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=num_q_heads != num_kv_heads
    )
    return output, None


def _fused_column_sums(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the fused attention + column sums kernel can run here (checked cheaply first, compiled last)."""
    return kernels.supports_fused_column_sums(queries, keys) and kernels.fused_column_sums_available()


def _eager(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_q_heads, n, head_dim = queries.shape
    num_kv_heads, total = keys.shape[1], keys.shape[-2]
    logits = grouped_logits(queries, keys)  # (B, Hkv, g, n, T)
    if is_causal:
        mask = torch.ones(n, total, dtype=torch.bool, device=keys.device).tril(total - n)[None, None]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    probabilities = weights.to(values.dtype).reshape(batch, num_kv_heads, -1, total)
    output = torch.matmul(probabilities, values).view(batch, num_q_heads, n, head_dim)
    return output, weights


def _sdpa_with_lse_cpu(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash kernel sdpa dispatches to, called directly for its log-sum-exp (H2O reuses it)."""
    groups = queries.shape[1] // keys.shape[1]
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=queries.dtype, device=queries.device).masked_fill_(~mask, float("-inf"))
        if additive.shape[1] > 1 and groups > 1:
            additive = additive.repeat_interleave(groups, dim=1)
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries, keys, values, 0.0, is_causal, attn_mask=additive
    )
    return output, lse


def _flash(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, is_causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional dependency, checked when the model is patched

    output = flash_attn_func(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), causal=is_causal
    )
    return output.transpose(1, 2)
