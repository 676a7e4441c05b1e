"""Methods built over another method's per-token scores (CriticalKV, ChunkKV): the scorer is named by ``base``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvfactory.methods.base import Compressor, WindowedCompressor


@dataclass(kw_only=True)
class OverScorer(WindowedCompressor):
    """A selection rule over the scores of another registered method (``base``, built with ``base_kwargs`` by
    :func:`kvfactory.methods.get`). The window is the scorer's (set ``window_size`` in ``base_kwargs``)."""

    base: str = "snapkv"
    base_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scorer: WindowedCompressor | None = None

    def bind_scorer(self, scorer: Compressor) -> None:
        """Use ``scorer``'s ``past_token_scores`` (kvfactory.methods.get calls this with the built ``base``)."""
        if not isinstance(scorer, WindowedCompressor) or scorer.layout != "dense":
            raise ValueError(f"{self.name}: base must be a per-token scorer (snapkv, h2o, l2norm, tova, keydiff, "
                             f"expected_attention, ...), got {self.base!r}")
        self.scorer = scorer
        self.window_size = scorer.window_size
        self.scores_with_queries = scorer.scores_with_queries  # type: ignore[misc]

    def attach(self, handle: Any) -> None:
        if self.scorer is not None:
            self.scorer.attach(handle)

    def full_scores(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer_idx: int
                    ) -> torch.Tensor:
        """The scorer's scores of every token ``(B, Hkv, n)`` fp32: the window at the highest past score (kvpress's
        convention: "use max score to make sure the window is not pruned")."""
        if self.scorer is None:
            raise ValueError(f"{self.name} has no scorer: build it with kvfactory.methods.get({self.name!r}, "
                             f"base=...) (or call bind_scorer)")
        past = self.scorer.past_token_scores(queries, keys, values, layer_idx=layer_idx).float()
        if self.scorer.num_sinks():
            past = past.clone()
            past[..., : self.scorer.num_sinks()] = past[..., self.scorer.num_sinks():].max()
        window = past.new_full((*past.shape[:2], self.window_size), float(past.max()) if past.numel() else 0.0)
        return torch.cat([past, window], dim=-1)

    def describe(self) -> dict[str, object]:
        described = super().describe()
        if self.scorer is not None:
            described["window_size"] = self.scorer.window_size
        return described
