"""ChunkKV: keep whole fixed-size chunks of tokens, ranked by a scorer's aggregated scores."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvfactory.methods.base import Selection
from kvfactory.methods.over_scorer import OverScorer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ChunkKV(OverScorer):
    """ChunkKV (Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
    Inference", arXiv:2502.00299), as kvpress's ``ChunkKVPress``.

    The sequence is cut into chunks of ``chunk_length`` tokens (the last one may be shorter). A chunk's score is the
    scorer's score (window at the top past score) summed over the KV heads and averaged over the chunk's tokens; the
    best ``max(1, ⌊chunks · C / n⌋)`` chunks are kept whole, the same tokens for every KV head: with a short last
    chunk left out this can exceed ``C`` by less than one chunk (kvpress's rule, kept). With no complete chunk the
    scorer selects alone.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per layer (default 512): ``C / n`` is kvpress's ``1 - compression_ratio``.
    chunk_length:
        Tokens per chunk (default 20).
    base:
        The scorer, any per-token method name (default ``"snapkv"``), with ``base_kwargs``.
    reuse_layers:
        Layer-wise index reuse: layers ``l`` with ``l % reuse_layers != 0`` keep the chunks of the layer before them
        (default 1: no reuse). Reuse holds within one batch call (a padded batch compresses sample by sample, so a
        reused selection is the one of the same sample only when the batch is unpadded or has one sample).
    decode_budget, compress_interval, max_capacity_prompt_ratio:
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "chunkkv"
    chunk_length: int = 20
    reuse_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk_length", "reuse_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"chunkkv: {name} must be a positive integer, got {value!r}")
        super().__post_init__()
        self._reused: dict[int, torch.Tensor] = {}

    def chunk_indices(self, scores: torch.Tensor, capacity: int) -> torch.Tensor | None:
        """Ascending kept positions ``(B, k)`` (every head the same), or None when there is no complete chunk."""
        batch, _, n = scores.shape
        complete, rest = divmod(n, self.chunk_length)
        if complete == 0:
            return None
        summed = scores.sum(dim=1)  # (B, n)
        chunk_scores = summed[:, : complete * self.chunk_length].view(batch, complete, self.chunk_length).mean(-1)
        if rest:
            chunk_scores = torch.cat([chunk_scores, summed[:, -rest:].mean(-1, keepdim=True)], dim=-1)
        chunks = complete + (rest > 0)
        kept = max(1, chunks * capacity // n)  # kvpress: int(chunks · (1 − ratio)), with 1 − ratio = C / n
        top = chunk_scores.topk(kept, dim=-1).indices  # (B, kept)
        positions = (top[..., None] * self.chunk_length + torch.arange(self.chunk_length, device=scores.device))
        positions = positions.flatten(1)
        member = torch.zeros(batch, n + 1, dtype=torch.bool, device=scores.device)
        member.scatter_(1, positions.clamp_max(n), True)  # past the end: the spare column n, dropped
        member = member[:, :n]
        counts = member.sum(dim=1)
        if bool((counts != counts[0]).any()):  # a short last chunk in some rows only: rank over the whole batch
            logger.debug("chunkkv: rows keep different counts; choosing the batch's chunks together")
            return self.chunk_indices(scores.sum(dim=0, keepdim=True).expand_as(scores), capacity)
        return member.nonzero()[:, 1].view(batch, -1)

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        batch, heads, n, _ = keys.shape
        reused = self._reused.get(layer_idx - 1) if layer_idx % self.reuse_layers else None
        if reused is not None and reused.shape[0] == batch and int(reused.max()) < n:
            indices = reused
        else:
            scores = self.full_scores(queries, keys, values, layer_idx)
            indices = self.chunk_indices(scores, capacity)
            if indices is None:
                assert self.scorer is not None
                return self.scorer.select(queries, keys, values, capacity=capacity, layer_idx=layer_idx,
                                          num_layers=num_layers)
        if self.reuse_layers > 1:
            self._reused[layer_idx] = indices
        return Selection(indices[:, None, :].expand(batch, heads, indices.shape[-1]))

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        return self.full_scores(queries, keys, values, layer_idx)[..., : keys.shape[-2] - self.window_size]
