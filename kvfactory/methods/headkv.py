"""HeadKV: static per-(layer, head) budgets from head-importance scores."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvfactory.methods.headwise import HeadwiseCompressor


def load_head_scores(path: str | Path) -> dict[str, list[float]]:
    """A head-importance file as published with HeadKV: one JSON object ``{"layer-head": [scores...]}``."""
    with open(path, encoding="utf-8") as handle:
        scores = json.loads(handle.read())
    if not isinstance(scores, dict) or not all("-" in key for key in scores):
        raise ValueError(f"{path}: expected a JSON object with 'layer-head' keys, as HeadKV publishes")
    return scores


@dataclass(kw_only=True)
class HeadKV(HeadwiseCompressor):
    """Head-level budgets from retrieval-reasoning head scores (Fu et al. 2024, "Not All Heads Matter: A Head-Level
    KV Cache Compression Method with Integrated Retrieval and Reasoning", arXiv:2410.19258).

    Table (KVCache-Factory's formula, on the past budget ``P = C − W``): ``m[l,h]`` = mean score of query head ``h`` of
    layer ``l``, ``p = m / Σm``, ``cap[l,h] = round(p · (P // head_beta) · L · Hq + P − P // head_beta)``; a GQA model
    averages the caps of each KV head's query group, then rounds. Each head keeps its top ``cap`` past tokens by
    pooled mean window attention, plus the window. Caps average ``C`` tokens per head window included (KVCF's
    average is ``C + W``: it spends the window on top of ``C``; here the budget equals SnapKV's).

    Parameters
    ----------
    head_path:
        A HeadKV-format JSON file (``kvfactory.retrieval_heads`` writes one for any model).
    head_scores:
        The same table as a dict (instead of ``head_path``).
    head_beta:
        Share of the budget given uniformly: ``P − P // head_beta`` per head (default 1.01).
    (others):
        As :class:`~kvfactory.methods.adakv.AdaKV`'s scoring (W=8, kernel 7, maxpool), without merge.
    """

    name = "headkv"
    head_path: str | None = None
    head_scores: dict[str, list[float]] | None = field(default=None, repr=False)
    head_beta: float = 1.01

    def __post_init__(self) -> None:
        if (self.head_path is None) == (self.head_scores is None):
            raise ValueError("headkv needs exactly one of head_path (a HeadKV JSON file) or head_scores (a dict)")
        if self.head_path is not None:
            self.head_scores = load_head_scores(self.head_path)
        if self.head_beta < 1:
            raise ValueError(f"headkv: head_beta must be >= 1, got {self.head_beta!r}")
        super().__post_init__()
        self._tables: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def query_head_means(self, num_layers: int, num_query_heads: int) -> torch.Tensor:
        """Mean score per (layer, query head), ``(L, Hq)``; a clear error when the file does not fit the model."""
        assert self.head_scores is not None
        means = torch.zeros(num_layers, num_query_heads, dtype=torch.float64)
        for key, values in self.head_scores.items():
            layer, head = (int(part) for part in key.split("-"))
            if layer >= num_layers or head >= num_query_heads:
                raise ValueError(f"headkv: the head scores name head {key}, but the model has {num_layers} layers "
                                 f"× {num_query_heads} query heads: the file belongs to another model")
            means[layer, head] = sum(values) / len(values) if values else 0.0
        return means

    def capacity_table(self, capacity: int, num_layers: int, num_query_heads: int, num_kv_heads: int) -> torch.Tensor:
        """Past tokens per (layer, KV head), ``(L, Hkv)`` int64."""
        key = (capacity, num_layers, num_query_heads, num_kv_heads)
        if key not in self._tables:
            means = self.query_head_means(num_layers, num_query_heads)
            share = means / means.sum() if means.sum() > 0 else torch.full_like(means, 1 / means.numel())
            past = capacity - self.window_size
            pooled = math.floor(past / self.head_beta)
            caps = torch.round(share * pooled * num_layers * num_query_heads + (past - pooled))
            groups = num_query_heads // num_kv_heads
            self._tables[key] = torch.round(caps.view(num_layers, num_kv_heads, groups).mean(-1)).long()
        return self._tables[key]

    def layer_token_budget(self, capacity: int, layer_idx: int, num_layers: int, num_query_heads: int,
                           num_kv_heads: int) -> int:
        table = self.capacity_table(capacity, num_layers, num_query_heads, num_kv_heads)
        return int(table[layer_idx].sum()) + num_kv_heads * self.window_size

    def head_caps(self, past_scores: torch.Tensor, capacity: int, layer_idx: int, num_layers: int,
                  num_query_heads: int) -> torch.Tensor:
        batch, heads, _ = past_scores.shape
        table = self.capacity_table(capacity, num_layers, num_query_heads, heads)
        return table[layer_idx].to(past_scores.device).expand(batch, heads)
