"""Unified: initial, separator, heavy-hitter and local tokens (the streaming project's combination)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import Selection, hold_prefill_budget, top_past_plus_window
from kvfactory.methods.h2o import H2O
from kvfactory.methods.sepllm import SeparatorTokens, needs_marks

SEPARATOR_MARK = float(2**20)  # added to a separator's accumulated attention (which stays below it)


@dataclass(kw_only=True)
class Unified(SeparatorTokens, H2O):
    """The streaming project's ``unified``: SepLLM (Chen et al. 2024, arXiv:2412.12094) and H2O (Zhang et al. 2023,
    arXiv:2306.14048) together: ``sink_size`` initial tokens, the ``separator_size`` most recent separator tokens,
    heavy hitters by accumulated attention, and the last ``window_size`` tokens. The heavy hitters fill what the
    sinks, separators and window leave of ``C`` (128 by default: C = 4 + 64 + 128 + 256 = 452).

    Separators are remembered in the per-slot accumulators (a separator's accumulator holds ``2**20`` plus its
    attention).

    Parameters
    ----------
    sink_size:
        Initial tokens (default 4).
    window_size:
        Recent tokens (default 256).
    separator_size:
        Separator slots (default 64).
    heavy_size:
        Heavy hitters (default 128); with the others sets ``max_capacity_prompt`` when that is not given.
    separators, separator_ids, tokenizer:
        As :class:`~kvfactory.methods.sepllm.SepLLM`.
    stream:
        Hold the cache at ``C`` while decoding unless ``decode_budget`` is given (default True).
    position_shift:
        Positions inside the cache (default False).
    compress_interval:
        Evict every this many decoded tokens (default 1; ``lazy_unified`` uses 10).
    (others):
        As :class:`~kvfactory.methods.h2o.H2O`.
    """

    name = "unified"
    needs_token_ids = True
    sink_size: int = 4
    window_size: int = 256
    separator_size: int = 64
    heavy_size: int = 128
    stream: bool = True
    position_shift: bool = False

    def __post_init__(self) -> None:
        for name in ("separator_size", "heavy_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{self.name}: {name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.max_capacity_prompt is None and self.max_capacity_prompt_ratio is None:
            self.max_capacity_prompt = self.sink_size + self.separator_size + self.heavy_size + self.window_size
        super().__post_init__()
        hold_prefill_budget(self, self.stream)
        self.find_separators()

    def token_marks(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.is_separator(token_ids).float() * SEPARATOR_MARK

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        scores = needs_marks(self.name, accumulated)
        if not self.needs_decode_attention:  # the cache passed the marks only: add the prompt's attention
            scores = scores + self.token_scores(queries, keys, prefill_attention)
        past = keys.shape[-2] - self.window_size
        middle = scores[..., :past]
        separator = middle >= SEPARATOR_MARK / 2
        attention = middle - separator * SEPARATOR_MARK
        slots = min(self.separator_size, capacity - self.window_size - self.sink_size)
        recency = torch.arange(1, past + 1, device=keys.device).float()
        newest = (separator * recency).topk(slots, dim=-1).indices if slots > 0 else None
        chosen = torch.zeros_like(separator)
        if newest is not None:
            chosen.scatter_(2, newest, True)
            chosen &= separator
        ranked = attention + chosen * (2 * SEPARATOR_MARK)
        indices = top_past_plus_window(ranked, capacity, self.window_size, self.sink_size)
        return Selection(indices, scores.gather(2, indices))


@dataclass(kw_only=True)
class LazyUnified(Unified):
    """``unified`` evicting only every ``compress_interval`` decoded tokens (default 10, the streaming project's
    ``lazy_unified``): the cache holds between C and C + 9 tokens. Parameters as :class:`Unified`."""

    name = "lazy_unified"
    compress_interval: int = 10
