"""KV merging: evicted tokens are folded into their most similar kept token instead of being dropped.

LOOK-M (Wan et al. 2024) / KVMerger (Wang et al. 2024) style, with KVCache-Factory's ``merge_kv`` semantics:
each evicted token ``d`` is matched to the kept token ``r`` (window and sinks included) whose key has the highest
cosine similarity ``c`` with its key; then

- ``pivot``:    ``K_r ← mean(K_r, {(K_d + K_r) / 2 : d matched to r})`` (the mean includes ``K_r`` itself);
- ``weighted``: ``K_r ← (K_r + Σ w_d K_d) / (1 + Σ w_d)`` with ``w_d = max((c + 1) / 2, 1e-6)``;

and the values likewise with the same matching and weights. The cache length stays the budget. Unlike
KVCache-Factory this is vectorized (no Python loop over batch × heads, no padding of the drop lists with duplicates).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvfactory.methods.scoring import gather_tokens

MERGE_MODES = ("pivot", "weighted")


def evicted_positions(kept: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(B, H, n - k)`` ascending positions not in ``kept (B, H, k)`` (every head keeps the same count)."""
    batch, heads, k = kept.shape
    is_evicted = torch.ones(batch, heads, seq_len, dtype=torch.bool, device=kept.device)
    is_evicted.scatter_(2, kept, False)
    return is_evicted.nonzero()[:, 2].view(batch, heads, seq_len - k)


def merge_evicted(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, window_size: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept keys/values ``(B, H, k, d)`` with the evicted tokens merged in (``window_size`` is unused: the window is
    part of ``kept`` and is a merge target like any kept token)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {mode!r}")
    kept_keys = gather_tokens(keys, kept)
    kept_values = gather_tokens(values, kept)
    evicted = evicted_positions(kept, keys.shape[-2])
    if evicted.shape[-1] == 0:
        return kept_keys, kept_values
    evicted_keys = gather_tokens(keys, evicted)
    evicted_values = gather_tokens(values, evicted)
    similarity = torch.matmul(
        F.normalize(evicted_keys.float(), dim=-1), F.normalize(kept_keys.float(), dim=-1).transpose(-1, -2)
    )
    best_cosine, target = similarity.max(dim=-1)  # (B, H, m)
    if mode == "pivot":
        weights = torch.ones_like(best_cosine)
    else:
        weights = ((best_cosine + 1) / 2).clamp_min(1e-6)
    merged = []
    for kept_tensor, evicted_tensor in ((kept_keys, evicted_keys), (kept_values, evicted_values)):
        base = kept_tensor.float()
        if mode == "pivot":
            # each matched pair contributes (K_d + K_r) / 2; the mean runs over K_r itself and every contribution
            contribution = (evicted_tensor.float() + gather_tokens(base, target)) / 2
        else:
            contribution = evicted_tensor.float() * weights.unsqueeze(-1)
        totals = torch.zeros_like(base).scatter_add_(2, target.unsqueeze(-1).expand_as(contribution), contribution)
        mass = torch.zeros(base.shape[:-1], device=base.device).scatter_add_(2, target, weights)
        merged.append(((base + totals) / (1 + mass).unsqueeze(-1)).to(kept_tensor.dtype))
    return merged[0], merged[1]
