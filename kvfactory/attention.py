"""The one attention function every patched layer calls: eager, sdpa or flash, GQA-native, with kvfactory's masks.

Keys and values arrive at KV-head granularity ``(B, Hkv, T, d)`` and are never repeated to the query heads: eager
groups the queries ``(B, Hkv, g·n, d)``, sdpa uses ``enable_gqa``, flash-attn handles GQA natively.

Masks are built here, not taken from transformers: the model's own mask describes the *logical* sequence, while the
cache holds a *physical* subset of it. The new ``n`` queries are always the last ``n`` slots of the keys, so

- causality is by slot: query ``i`` sees slot ``j`` iff ``j <= T - n + i``;
- padding is a per-slot validity mask ``(B, T)`` kept by the cache (padded query rows attend everywhere, so they stay
  finite; their outputs are never used);
- a sliding window (Mistral) is by position: query at position ``p`` sees a key at ``q`` iff ``p - q < window``.

flash_attention_2 runs flash-attn's kernels for every case they can express: a prompt attending to itself (causal,
left padding as ``flash_attn_varlen_func`` over the real tokens with ``cu_seqlens``, the sliding window as
``window_size=(window - 1, 0)`` when positions follow the slots), and new tokens over an unpadded cache whose window,
if any, is not reached yet (flash-attn's causal mask is aligned to the bottom-right corner, as kvfactory's). The
other cases (a padded or windowed compressed cache, attention weights asked for) run sdpa with kvfactory's mask:
masks there are ``(B, 1, n, T)`` with few queries.
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


def require_flash_attn() -> None:
    """Raise a ValueError saying what to do when flash_attention_2 is asked for and flash-attn is not installed."""
    if not flash_attn_available():
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed here "
            f"(it needs CUDA). Accepted implementations: {', '.join(ATTENTION_IMPLEMENTATIONS)}; without flash-attn use "
            "'sdpa' (or 'eager'), or install flash-attn on a CUDA machine (pip install flash-attn --no-build-isolation)"
        )


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
        # no host check of whether any key is out of reach (a device sync per layer): a caller that knows every
        # position is below the window passes sliding_window=None (CompressedCache.step_spec)
        distance = query_positions[..., :, None] - key_positions[:, :, None, :].to(query_positions.dtype)
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
    if spec.implementation == "flash_attention_2" and not need_weights:
        flashed = _flash_attend(queries, keys, values, spec, key_valid, query_valid, query_positions, key_positions,
                                need_lse)
        if flashed is not None:
            return flashed
    mask = build_mask(
        batch, n, total, keys.device, key_valid=key_valid, query_valid=query_valid,
        sliding_window=spec.sliding_window, query_positions=query_positions, key_positions=key_positions,
    )
    is_causal = mask is None and n > 1
    if need_weights or spec.implementation == "eager":
        return _eager(queries, keys, values, mask, is_causal)
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


def _flash_attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, spec: AttentionSpec,
    key_valid: torch.Tensor | None, query_valid: torch.Tensor | None, query_positions: torch.Tensor | None,
    key_positions: torch.Tensor | None, need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`attend` through flash-attn, or None for the cases its kernels cannot express (see the module
    docstring); the second result is the lse ``(B, Hq, n)`` fp32 when ``need_lse`` and unpadded, else None."""
    n, total = queries.shape[-2], keys.shape[-2]
    window = spec.sliding_window
    if n == total:  # a prompt attending to itself
        window_size = (-1, -1)
        if window is not None and n > window:
            if query_positions is None or not _positions_follow_slots(query_positions, query_valid):
                return None
            window_size = (window - 1, 0)  # kvfactory's window sees distances < window; flash's left bound is <=
        if key_valid is None and query_valid is None:
            return _flash(queries, keys, values, n > 1, window_size, need_lse)
        if key_valid is not None and query_valid is not None and (key_valid is query_valid
                                                                  or torch.equal(key_valid, query_valid)):
            return _flash_varlen(queries, keys, values, query_valid, window_size), None
        return None
    if key_valid is not None or query_valid is not None:
        return None
    if window is not None:  # a window the caller could not rule out on the host (CompressedCache.step_spec)
        return None
    return _flash(queries, keys, values, n > 1, (-1, -1), False)


def _positions_follow_slots(positions: torch.Tensor, valid: torch.Tensor | None) -> bool:
    """Whether each row's real tokens have consecutive positions in slot order (then a window by position is a
    window by slot, which is what flash-attn's ``window_size`` is)."""
    if valid is None:
        return bool((positions.diff(dim=1) == 1).all())
    offsets = (positions - valid.cumsum(dim=1)).masked_fill(~valid, 0)
    high = offsets.masked_fill(~valid, torch.iinfo(offsets.dtype).min).amax(dim=1)
    low = offsets.masked_fill(~valid, torch.iinfo(offsets.dtype).max).amin(dim=1)
    return bool(((high == low) | ~valid.any(dim=1)).all())


def _flash(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool,
           window_size: tuple[int, int] = (-1, -1), need_lse: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    from flash_attn import flash_attn_func  # optional dependency, checked when the model is patched

    result = flash_attn_func(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), causal=causal,
                             window_size=window_size, return_attn_probs=need_lse)
    if need_lse:
        output, lse, _ = result
        return output.transpose(1, 2), lse[..., : queries.shape[-2]]  # (B, Hq, n) fp32; never padded past n
    return result.transpose(1, 2), None


def _flash_varlen(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                  window_size: tuple[int, int]) -> torch.Tensor:
    """A padded prompt ``valid (B, n)`` as packed real tokens with ``cu_seqlens`` (``flash_attn_varlen_func``);
    padded query rows get zeros (never used)."""
    from flash_attn import flash_attn_varlen_func

    batch, num_q_heads, n, head_dim = queries.shape
    indices = valid.flatten().nonzero().flatten()
    lengths = valid.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())

    def packed(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2).reshape(batch * n, states.shape[1], head_dim).index_select(0, indices)

    output = flash_attn_varlen_func(packed(queries), packed(keys), packed(values), cu_seqlens, cu_seqlens, longest,
                                    longest, causal=True, window_size=window_size)
    padded = output.new_zeros(batch * n, num_q_heads, head_dim)
    padded[indices] = output
    return padded.view(batch, n, num_q_heads, head_dim).transpose(1, 2)
