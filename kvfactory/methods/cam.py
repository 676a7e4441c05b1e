"""CAM: merge the values of tokens about to be evicted into their successors."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvfactory.methods.base import WindowedCompressor, gather_tokens
from kvfactory.methods.scoring import reduce_groups, window_attention


@dataclass(kw_only=True)
class CAM(WindowedCompressor):
    """Cache merging (Zhang et al. 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024), as
    KVCache-Factory simulates it at prefill.

    Scores: SnapKV's window attention, unpooled. Merge: a streaming eviction of every token ``m`` past the first
    ``S0 = ceil(start_budget_ratio · n)`` is simulated; token ``m`` is merged into the next ``W`` tokens' values
    (``V[m+1 : m+W+1] += V[m] / W``) with probability ``a_m / max(a[:S0] ∪ a[m:m+W])``, ``a`` = the window queries'
    mean attention, drawn from a generator seeded by ``seed`` and the layer. Then the top ``C - W`` past tokens (by
    the pre-merge scores) plus the window are kept, with merged values.

    Deviations from KVCache-Factory (its bugs, not copied): the caller's value tensor is not modified in place, so the
    prefill attention output is the model's own; every batch row is merged, not only row 0; the generator is private.
    While decoding (``decode_budget``), eviction uses the same scores without the value merge.

    Parameters
    ----------
    start_budget_ratio:
        Fraction of the prompt treated as the always-kept start of the simulated stream (default 0.1).
    seed:
        Seed of the Bernoulli merge draws.
    (others):
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "cam"
    start_budget_ratio: float = 0.1
    seed: int = 0
    scores_with_queries = True

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"cam: window_size must be at least 1 (the merge targets), got {self.window_size!r}")
        if not 0 < self.start_budget_ratio < 1:
            raise ValueError(f"cam: start_budget_ratio must be in (0, 1), got {self.start_budget_ratio!r}")
        super().__post_init__()

    def window_scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Window attention reduced over each query group, ``(B, Hkv, W, n)``."""
        return reduce_groups(window_attention(queries, keys, self.window_size), self.gqa_score_agg)

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        past = keys.shape[-2] - self.window_size
        return self.window_scores(queries, keys)[..., :past].sum(dim=-2)

    def merge_probabilities(self, mean_attention: torch.Tensor, start: int) -> torch.Tensor:
        """Probability that token ``m`` (for ``m`` in ``[start, n - W)``) is merged forward, ``(B, Hkv, n - W - start)``."""
        n = mean_attention.shape[-1]
        sink_max = mean_attention[..., :start].amax(dim=-1, keepdim=True)
        recent_max = mean_attention.unfold(-1, self.window_size, 1)[..., start : n - self.window_size, :].amax(-1)
        ratio = mean_attention[..., start : n - self.window_size] / torch.maximum(sink_max, recent_max)
        return torch.nan_to_num(ratio, nan=0.0, posinf=1.0).clamp(0.0, 1.0)

    def merged_values(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """The values after the simulated streaming merge (a new tensor)."""
        n = keys.shape[-2]
        start = math.ceil(self.start_budget_ratio * n)
        if start >= n - self.window_size:
            return values
        mean_attention = self.window_scores(queries, keys).float().mean(dim=-2)
        probabilities = self.merge_probabilities(mean_attention, start)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + layer_idx)
        merge = torch.bernoulli(probabilities.cpu(), generator=generator).to(values.device)
        merged = values.float().clone()
        for offset in merge.flatten(0, 1).any(dim=0).nonzero().flatten().tolist():
            m = start + offset
            share = (merge[..., offset] / self.window_size)[..., None, None]
            merged[:, :, m + 1 : m + self.window_size + 1] += merged[:, :, m : m + 1] * share
        return merged.to(values.dtype)

    def kept_key_values(self, queries, keys, values, selection, layer_idx):
        merged = self.merged_values(queries, keys, values, layer_idx)
        return gather_tokens(keys, selection.indices), gather_tokens(merged, selection.indices)
