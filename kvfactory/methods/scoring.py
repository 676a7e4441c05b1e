"""Score primitives shared by the compression methods: grouped (GQA) attention scores, pooling, group reduction.

All functions take post-RoPE tensors ``queries (B, Hq, n_q, d)`` and ``keys (B, Hkv, n, d)`` and never repeat keys to
the query heads: queries are viewed as ``(B, Hkv, g, n_q, d)`` (query head ``h`` belongs to KV head ``h // g``, the
``repeat_kv`` order of transformers), so no ``Hq``-sized copy of the keys is ever made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvfactory.attention import grouped_logits

GQA_AGGREGATIONS = ("mean", "max", "sum")
POOLINGS = ("maxpool", "avgpool")

# Column sums of the full causal attention are computed over query chunks holding at most this many fp32 scores:
# about 16 MB on CPU (small chunks stay in cache, which measured fastest there); 256 MB on accelerators, where a
# 32k-token prompt with 32 query heads would otherwise take 8192 Python-level steps per layer.
_SCORE_CHUNK_ELEMENTS = 1 << 22
_ACCELERATOR_SCORE_CHUNK_ELEMENTS = 1 << 26


def score_chunk_elements(device: torch.device) -> int:
    """fp32 scores one query chunk of the column-sum / log-sum-exp passes may hold on ``device``."""
    return _SCORE_CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_SCORE_CHUNK_ELEMENTS

# PyTorch's CPU flash-attention kernel, which also returns each query's log-sum-exp (None where absent)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``(B, H, n, d)`` along the sequence with ``(B, H, k)`` indices."""
    return tensor.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def window_attention(queries: torch.Tensor, keys: torch.Tensor, window_size: int) -> torch.Tensor:
    """Softmax attention of the last ``window_size`` queries over all keys, ``(B, Hkv, g, W, n)`` in the keys' dtype.

    The last ``W`` queries are the queries of the last ``W`` keys, so the ``W × W`` block is causally masked (window
    query ``i`` does not see window key ``j > i``). The softmax runs in fp32 and is cast back to the model dtype, as
    SnapKV and KVCache-Factory do.
    """
    window = queries[..., -window_size:, :]
    logits = grouped_logits(window, keys).float()
    n = keys.shape[-2]
    w = window.shape[-2]
    future = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., n - w :].masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1).to(keys.dtype)


def _query_chunks(queries: torch.Tensor, keys: torch.Tensor) -> range:
    batch, num_q_heads, n, _ = queries.shape
    chunk = max(1, score_chunk_elements(keys.device) // max(1, batch * num_q_heads * keys.shape[-2]))
    return range(0, n, chunk)


def _causal_chunk_logits(queries: torch.Tensor, keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """fp32 logits of queries ``[start, stop)`` against keys ``[0, stop)`` (later keys are all in the future),
    the future inside the chunk set to -inf: ``(B, Hkv, g, stop - start, stop)``."""
    logits = grouped_logits(queries[..., start:stop, :], keys[..., :stop, :]).float()
    future = torch.ones(stop - start, stop - start, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., start:stop].masked_fill_(future, float("-inf"))
    return logits


@dataclass(frozen=True)
class PrefillAttention:
    """What the prefill attention already computed, so that scoring need not compute it again.

    ``lse (B, Hq, n)`` is each query's log-sum-exp (the CPU flash kernel returns it); ``column_sums (B, Hq, n)`` is
    the attention every token received, summed over the real queries (the eager path materializes the weights; on
    CPU sdpa the fused kernel of :mod:`kvfactory.kernels` sums them while it attends).
    Either may be None.
    """

    lse: torch.Tensor | None = None
    column_sums: torch.Tensor | None = None

    @classmethod
    def from_kernel(cls, extra: torch.Tensor, query_valid: torch.Tensor | None = None) -> PrefillAttention:
        """From :func:`kvfactory.attention.attend`'s second result: eager weights ``(B, Hkv, g, n, T)``, column
        sums ``(B, Hkv, g, n)`` (the fused kernel, unpadded prompts only) or an lse ``(B, Hq, n)``. Padded query
        rows (``query_valid`` False) attend everywhere, so they are left out of the weights' sums."""
        if extra.dim() == 3:
            return cls(lse=extra)
        if extra.dim() == 4:
            return cls(column_sums=extra.flatten(1, 2))
        if query_valid is not None:
            extra = extra * query_valid[:, None, None, :, None]
        return cls(column_sums=extra.sum(dim=3).flatten(1, 2))

    def tokens(self, row: int, real: torch.Tensor) -> PrefillAttention:
        """The same facts for batch row ``row``'s tokens ``real`` only."""
        return PrefillAttention(*(None if t is None else t[row : row + 1].index_select(2, real)
                                  for t in (self.lse, self.column_sums)))


def causal_logsumexp(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp of each query's causal logits, ``(B, Hq, n)`` fp32 (when the attention kernel did not give it)."""
    batch, num_q_heads, n, _ = queries.shape
    if keys.device.type == "cpu" and _CPU_FLASH is not None:
        expanded = keys.float().repeat_interleave(num_q_heads // keys.shape[1], dim=1)
        return _CPU_FLASH(queries.float(), expanded, expanded, 0.0, True)[1]
    lse = torch.empty(batch, keys.shape[1], num_q_heads // keys.shape[1], n, device=keys.device)
    step = _query_chunks(queries, keys).step
    for start in range(0, n, step):
        stop = min(n, start + step)
        lse[..., start:stop] = torch.logsumexp(_causal_chunk_logits(queries, keys, start, stop), dim=-1)
    return lse.view(batch, num_q_heads, n)


def causal_column_sums(queries: torch.Tensor, keys: torch.Tensor,
                       prefill: PrefillAttention | None = None) -> torch.Tensor:
    """Σ over every query of its causal softmax attention to each key, ``(B, Hkv, g, n)`` in fp32.

    Query ``i`` is the query of key ``i`` (a prompt attending to itself). When the prefill attention already gave
    the column sums (eager) they are returned as they are. With the attention's log-sum-exp ``prefill.lse (B, Hq,
    n)`` (from the prefill kernel) one pass suffices: ``Σ_i exp(q_i·k_j/√d − lse_i)``; otherwise it is computed
    first. On CPU the pass is one call of the flash kernel, elsewhere it runs over query chunks; either way no
    ``n × n`` fp32 tensor is ever allocated.
    """
    batch, num_q_heads, n, _ = queries.shape
    if prefill is not None and prefill.column_sums is not None:
        return prefill.column_sums.float().view(batch, keys.shape[1], num_q_heads // keys.shape[1], n)
    lse = None if prefill is None else prefill.lse
    if lse is None:
        lse = causal_logsumexp(queries, keys)
    if keys.device.type == "cpu" and _CPU_FLASH is not None:
        return _column_sums_by_cpu_flash(queries, keys, lse)
    return _column_sums_in_chunks(queries, keys, lse)


def _column_sums_in_chunks(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """:func:`causal_column_sums` over query chunks (any device): ``exp(logits − lse)`` summed chunk by chunk."""
    batch, num_q_heads, n, _ = queries.shape
    num_kv_heads = keys.shape[1]
    lse = lse.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, n)
    sums = torch.zeros(batch, num_kv_heads, num_q_heads // num_kv_heads, n, dtype=torch.float32, device=keys.device)
    step = _query_chunks(queries, keys).step
    for start in range(0, n, step):
        stop = min(n, start + step)
        logits = _causal_chunk_logits(queries, keys, start, stop)
        logits.sub_(lse[..., start:stop, None])
        sums[..., :stop] += logits.exp_().sum(dim=-2)
    return sums


def _column_sums_by_cpu_flash(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """:func:`causal_column_sums` in one pass of the CPU flash-attention kernel (5× faster than Python chunks).

    The column sum of key ``j`` is ``Σ_{i≥j} exp(q_i·k_j/√d − lse_i)``: a log-sum-exp over queries, which is what
    the kernel returns when the roles are swapped. Keys become the queries ``[k_j/√d, 1]``, queries become the keys
    ``[q_i, −lse_i]`` (so their dot product is the shifted logit, scale 1), and both sequences are reversed so that
    "``i ≥ j``" is the kernel's causal mask. The kernel's log-sum-exp of key ``j`` is the log of its column sum.
    Buffers are ``(B, Hq, n, d + 1)``: no ``n × n`` tensor exists.
    """
    batch, num_q_heads, n, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    groups = num_q_heads // num_kv_heads
    ones = torch.ones(batch, num_q_heads, n, 1, dtype=torch.float32)
    swapped_queries = torch.cat([keys.float().repeat_interleave(groups, dim=1) / math.sqrt(head_dim), ones], -1)
    swapped_keys = torch.cat([queries.float(), -lse.float().view(batch, num_q_heads, n, 1)], -1)
    swapped_queries, swapped_keys = swapped_queries.flip(2), swapped_keys.flip(2)
    _, log_sums = _CPU_FLASH(swapped_queries, swapped_keys, torch.zeros_like(swapped_keys), 0.0, True, scale=1.0)[:2]
    return log_sums.flip(-1).exp().view(batch, num_kv_heads, groups, n)


def reduce_groups(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce per-query-head scores ``(B, Hkv, g, ...)`` to one score per KV head ``(B, Hkv, ...)``."""
    if how == "mean":
        return scores.mean(dim=2)
    if how == "max":
        return scores.amax(dim=2)
    if how == "sum":
        return scores.sum(dim=2)
    raise ValueError(f"gqa_score_agg must be one of {GQA_AGGREGATIONS}, got {how!r}")


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Smooth ``(B, H, L)`` scores along the sequence (stride 1, padding ``k // 2``; avgpool counts the padding)."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    if pooling == "maxpool":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    elif pooling == "avgpool":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooled[..., : scores.shape[-1]].reshape(scores.shape)
