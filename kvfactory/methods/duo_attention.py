"""DuoAttention: retrieval heads keep the full cache, streaming heads keep sinks + recent tokens."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kvfactory.methods.base import Compressor
from kvfactory.methods.scoring import PrefillAttention

logger = logging.getLogger(__name__)

ESTIMATE_TOKENS = 500  # kvpress's on-the-fly estimate uses q_len=500


def load_pattern_file(path: str, num_kv_heads: int | None = None) -> list[list[float]]:
    """Head scores ``(L, Hkv)`` from DuoAttention's ``full_attention_heads.tsv`` (one row per layer, tab-separated,
    clipped to [0, 1] as DuoAttention does) or a HeadKV-format JSON ``{"layer-head": [...]}`` (kvfactory.retrieval_heads;
    query heads averaged per KV head)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        scores = json.loads(text)
        layers = 1 + max(int(key.split("-")[0]) for key in scores)
        heads = 1 + max(int(key.split("-")[1]) for key in scores)
        table = torch.zeros(layers, heads)
        for key, values in scores.items():
            layer, head = (int(part) for part in key.split("-"))
            table[layer, head] = sum(values) / len(values) if values else 0.0
        groups = heads // (num_kv_heads or heads)
        return table.view(layers, -1, groups).mean(-1).tolist()
    rows = [[min(1.0, max(0.0, float(x))) for x in line.split("\t")] for line in text.splitlines() if line.strip()]
    if not rows or len({len(row) for row in rows}) != 1:
        raise ValueError(f"{path}: expected DuoAttention's full_attention_heads.tsv, one tab-separated row per layer")
    return rows


@torch.no_grad()
def estimate_head_scores(model: Any, tokens: int = ESTIMATE_TOKENS, seed: int = 0) -> list[list[float]]:
    """kvpress's on-the-fly statistic on the model's real attention: one forward of a fixed pseudo-random prompt;
    per query head the area under the cumulated attention of the last token, averaged per KV head ``(L, Hkv)``."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, config.vocab_size - 10, (1, tokens), generator=generator)
    device = next(model.parameters()).device
    output = model(ids.to(device), output_attentions=True, use_cache=False)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    table = []
    for attention in output.attentions:  # (1, Hq, n, n)
        area = attention[0, :, -1].float().cumsum(-1).mean(-1)  # (Hq,)
        table.append(area.view(kv_heads, heads // kv_heads).mean(-1).tolist())
    return table


@dataclass(kw_only=True)
class DuoAttention(Compressor):
    """DuoAttention (Xiao et al. 2025, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
    Streaming Heads", arXiv:2410.10819), as kvpress's ``DuoAttentionPress``.

    The ``round(L · Hkv · head_compression_ratio)`` (layer, KV head) pairs with the lowest head scores are streaming
    heads: they keep the first ``sink_size`` and the last ``recent_size`` tokens; the others (retrieval heads) keep
    everything. The streaming heads' memory is really freed (ragged storage), and while decoding they are trimmed
    back to ``sink_size + recent_size`` every ``compress_interval`` tokens.

    Head scores, in order of precedence: ``head_scores`` (an ``(L, Hkv)`` list), ``pattern_path`` (DuoAttention's
    ``full_attention_heads.tsv`` or a ``kvfactory.retrieval_heads`` JSON), else estimated when ``kvfactory.patch``
    attaches the method: kvpress's on-the-fly statistic (area under the last token's cumulated attention) on one
    forward of a fixed 500-token pseudo-random prompt.

    This method's budget is ``head_compression_ratio`` with ``sink_size``/``recent_size``; ``max_capacity_prompt``
    (what the runners pass as ``--max_capacity_prompts``), when given, is a streaming head's whole budget:
    ``recent_size = max_capacity_prompt − sink_size`` (``sink_size`` becomes ``C // 4`` when ``C <= sink_size``).

    Parameters
    ----------
    head_compression_ratio:
        Share of (layer, KV head) pairs made streaming heads (default 0.5).
    sink_size:
        Leading tokens a streaming head keeps (default 64, DuoAttention's published patterns).
    recent_size:
        Recent tokens a streaming head keeps (default 256).
    pattern_path:
        DuoAttention TSV or HeadKV-format JSON with head scores (default None).
    head_scores:
        Head scores ``(L, Hkv)`` (default None).
    compress_interval:
        Decoded tokens between re-trims of the streaming heads (default 64).
    max_capacity_prompt:
        Tokens a streaming head keeps, sinks included (default None: ``sink_size + recent_size``).
    """

    name = "duo_attention"
    layout = "ragged"
    head_compression_ratio: float = 0.5
    sink_size: int = 64
    recent_size: int = 256
    pattern_path: str | None = None
    head_scores: list[list[float]] | None = field(default=None, repr=False)
    compress_interval: int = 64
    max_capacity_prompt: int | None = None

    def __post_init__(self) -> None:
        if self.max_capacity_prompt is not None:
            if not isinstance(self.max_capacity_prompt, int) or self.max_capacity_prompt < 2:
                raise ValueError(f"duo_attention: max_capacity_prompt={self.max_capacity_prompt!r} (a streaming head's "
                                 f"tokens) must be an integer of at least 2")
            if self.max_capacity_prompt <= self.sink_size:  # a small budget: a quarter of it for the sinks
                self.sink_size = self.max_capacity_prompt // 4 or 1
            self.recent_size = self.max_capacity_prompt - self.sink_size
        if not 0 <= self.head_compression_ratio <= 1:
            raise ValueError(f"duo_attention: head_compression_ratio must be in [0, 1], got {self.head_compression_ratio!r}")
        for name in ("sink_size", "recent_size", "compress_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "compress_interval" else 0):
                raise ValueError(f"duo_attention: {name} must be a {'positive' if name == 'compress_interval' else 'non-negative'} "
                                 f"integer, got {value!r}")
        if self.head_scores is None and self.pattern_path is not None:
            self.head_scores = load_pattern_file(self.pattern_path)
        self._streaming: torch.Tensor | None = None

    def attach(self, handle: Any) -> None:
        config = handle.model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if self.head_scores is None:
            logger.info("duo_attention: no head patterns given; estimating them from the model (kvpress's on-the-fly "
                        "statistic on a %d-token pseudo-random prompt)", ESTIMATE_TOKENS)
            self.head_scores = estimate_head_scores(handle.model)
        elif self.pattern_path is not None and self.pattern_path.endswith(".json"):
            self.head_scores = load_pattern_file(self.pattern_path, kv_heads)
        shape = (len(self.head_scores), len(self.head_scores[0]))
        if shape != (handle.num_layers, kv_heads):
            raise ValueError(f"duo_attention: the head scores are {shape[0]} layers × {shape[1]} KV heads, the model "
                             f"has {handle.num_layers} × {kv_heads}: the patterns belong to another model")
        self._streaming = None

    def streaming_mask(self) -> torch.Tensor:
        """``(L, Hkv)`` bool: the streaming heads."""
        if self.head_scores is None:
            raise ValueError("duo_attention needs head patterns: give pattern_path (DuoAttention's "
                             "full_attention_heads.tsv, or a kvfactory.retrieval_heads JSON) or head_scores, or run it "
                             "through kvfactory.patch, which estimates them from the model")
        if self._streaming is None:
            scores = torch.tensor(self.head_scores, dtype=torch.float64)
            mask = torch.zeros(scores.numel(), dtype=torch.bool)
            pruned = round(scores.numel() * self.head_compression_ratio)
            if pruned:
                mask[scores.flatten().argsort(stable=True)[:pruned]] = True
            self._streaming = mask.view(scores.shape)
        return self._streaming

    @property
    def decode_budget_tokens(self) -> int | None:
        return self.sink_size + self.recent_size if bool(self.streaming_mask().any()) else None

    @property
    def decode_interval(self) -> int:
        return self.compress_interval

    def layer_token_budget(self, capacity: int, layer_idx: int, num_layers: int, num_query_heads: int,
                           num_kv_heads: int) -> int:
        streaming = int(self.streaming_mask()[layer_idx].sum())
        return (num_kv_heads - streaming) * capacity + streaming * min(capacity, self.sink_size + self.recent_size)

    def select_mask(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                    num_layers: int = 1, capacity: int | None = None, key_valid: torch.Tensor | None = None,
                    prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        batch, heads, n, _ = keys.shape
        valid = key_valid if key_valid is not None else torch.ones(batch, heads, n, dtype=torch.bool,
                                                                   device=keys.device)
        streaming = self.streaming_mask()[layer_idx].to(keys.device)
        rank = valid.long().cumsum(-1) - 1  # index among the head's real tokens
        count = valid.sum(-1, keepdim=True)
        ends = (rank < self.sink_size) | (rank >= count - self.recent_size)
        return valid & (ends | ~streaming[None, :, None])

    def compress(self, query_states: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                 layer_idx: int = 0, num_layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept keys/values flattened in (sample, head, position) order, ``(N, d)`` each."""
        keep = self.select_mask(query_states, key_states, value_states, layer_idx=layer_idx, num_layers=num_layers)
        return key_states[keep], value_states[keep]
