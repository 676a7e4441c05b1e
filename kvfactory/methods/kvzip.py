"""KVzip: query-agnostic scores from the attention a context receives while the model repeats it."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from kvfactory.methods.base import BudgetedCompressor
from kvfactory.methods.scoring import PrefillAttention

logger = logging.getLogger(__name__)

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass(kw_only=True)
class KVzip(BudgetedCompressor):
    """KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    arXiv:2505.23416), as kvpress's ``KVzipPress``.

    Before the prompt is prefilled, the model reads it once more into a scratch full cache and is then asked to
    reconstruct it: for each ``chunk_size``-token chunk of the context, ``"Repeat the previous context exactly."``
    (later chunks: ``"... starting with"`` and the previous chunk's last ``prev_postfix_size`` tokens), a newline and
    the chunk itself are run over the scratch cache. A context token's score is the largest attention any of those
    queries of its KV head's group gives it, the softmax taken over the sinks, the chunk and the repeat tokens (as
    kvpress); the first ``n_sink`` tokens score 1. Then the real prefill keeps, per sample, the ``L · Hkv · C``
    best (layer, KV head, token) scores of the whole model (``layerwise=False``, kvpress's default) or the ``Hkv · C``
    best of each layer: a head-wise cache (ragged storage, memory really freed).

    The cost is the extra passes: about three prefills in all (the scratch prefill, the repeat pass over twice the
    context, the real prefill); ``benchmarks/core_speed_memory.py`` prints it. The prompt is tokenized with the model's
    tokenizer when ``kvfactory.patch`` can load it from ``config._name_or_path``; else the chunk is repeated without
    the instruction.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per KV head on average over the model (default 512); ``max_capacity_prompt_ratio`` keeps
        ``round(n · ratio)``.
    layerwise:
        The same budget for every layer instead of one over the whole model (default False).
    n_sink:
        Leading tokens always kept (default 4).
    chunk_size:
        Context tokens reconstructed per pass (default 2048).
    prev_postfix_size:
        Tokens of the previous chunk quoted in the next prompt (default 8).
    """

    name = "kvzip"
    layout = "ragged"
    layerwise: bool = False
    n_sink: int = 4
    chunk_size: int = 2048
    prev_postfix_size: int = 8
    reconstructs_context = True

    def __post_init__(self) -> None:
        if self.decode_budget is not None:
            raise ValueError("kvzip compresses the context once (query-agnostic); decode_budget is not accepted")
        for name in ("n_sink", "chunk_size", "prev_postfix_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "chunk_size" else 0):
                raise ValueError(f"kvzip: {name} must be a {'positive' if name == 'chunk_size' else 'non-negative'} "
                                 f"integer, got {value!r}")
        super().__post_init__()
        self.tokenizer: Any = None
        self._scores: list[torch.Tensor] = []  # per layer, (Hkv, n) of the sample being scored
        self._masks: dict[int, list[torch.Tensor]] = {}  # per layer, the (Hkv, n) keep masks of the samples scored

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "tokenizer": None if self.tokenizer is None else type(self.tokenizer).__name__}

    def attach(self, handle: Any) -> None:
        path = getattr(handle.model.config, "_name_or_path", "")
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path) if path else None
        except Exception as error:  # no tokenizer next to the weights: repeat without the instruction
            logger.info("kvzip: no tokenizer at %r (%s); the chunks are repeated without the instruction", path, error)
            self.tokenizer = None

    # -- reconstruction (driven by kvfactory.patching) ----------------------------------------------------------
    def _encode(self, text: str, device: torch.device) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long, device=device)

    def reconstruction_passes(self, context: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """``(start, end, repeat_ids)`` per chunk of the 1-D ``context`` ids."""
        passes = []
        newline = self._encode("\n", context.device)
        for start in range(0, context.shape[0], self.chunk_size):
            end = min(context.shape[0], start + self.chunk_size)
            if start == 0:
                prompt = self._encode(FIRST_PROMPT, context.device)
            else:
                postfix = context[max(0, start - self.prev_postfix_size) : start]
                prompt = torch.cat([self._encode(NEXT_PROMPT, context.device), postfix])
            passes.append((start, end, torch.cat([prompt, newline, context[start:end]])))
        return passes

    def begin_sample(self, num_layers: int, num_kv_heads: int, length: int, device: torch.device) -> None:
        self._scores = [torch.zeros(num_kv_heads, length, device=device) for _ in range(num_layers)]
        for scores in self._scores:
            scores[:, : self.n_sink] = 1.0

    def observe(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, start: int, end: int) -> None:
        """Fold one repeat pass of layer ``layer_idx``: ``queries (1, Hq, m, d)`` of the repeat tokens, ``keys (1,
        Hkv, T, d)`` the scratch cache (context then the ``m`` repeat tokens)."""
        _, num_q_heads, m, dim = queries.shape
        heads = keys.shape[1]
        groups = num_q_heads // heads
        sink = min(self.n_sink, start)
        subset = torch.cat([keys[:, :, :sink], keys[:, :, start:end], keys[:, :, -m:]], dim=2).float()
        grouped = queries.float().reshape(1, heads, groups, m, dim)
        best = torch.zeros(heads, end - start, device=keys.device)
        step = max(1, (1 << 24) // max(1, num_q_heads * subset.shape[2]))
        for first in range(0, m, step):
            last = min(m, first + step)
            # in place where the reference allocates (the same numbers): the fp32 logits dominate KVzip's cost
            logits = (grouped[:, :, :, first:last] @ subset[:, :, None].transpose(-1, -2)).div_(math.sqrt(dim))
            rows = torch.arange(first, last, device=keys.device)[:, None]
            future = torch.arange(m, device=keys.device)[None, :] > rows  # causal among the repeat tokens
            logits[..., -m:].masked_fill_(future, float("-inf"))
            weights = logits.softmax(dim=-1)[..., sink : sink + end - start]
            best = torch.maximum(best, weights.amax(dim=(2, 3))[0])
        self._scores[layer_idx][:, start:end] = best
        self._scores[layer_idx][:, : self.n_sink] = 1.0  # the sinks stay kept (kvpress: when a template prefix holds them)

    def end_sample(self, capacity: int) -> None:
        """Turn the sample's scores into keep masks: the top ``L · Hkv · C`` of the model (or ``Hkv · C`` per layer)."""
        scores = torch.stack(self._scores)  # (L, Hkv, n)
        layers, heads, n = scores.shape
        if self.layerwise:
            top = scores.flatten(1).topk(min(heads * capacity, heads * n), dim=-1).indices
            keep = torch.zeros(layers, heads * n, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
        else:
            top = scores.flatten().topk(min(layers * heads * capacity, scores.numel())).indices
            keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, top, True)
        for layer, mask in enumerate(keep.view(layers, heads, n)):
            self._masks.setdefault(layer, []).append(mask)
        self._scores = []

    def layer_token_budget(self, capacity: int, layer_idx: int, num_layers: int, num_query_heads: int,
                           num_kv_heads: int) -> int:
        return num_kv_heads * capacity  # the model-wide budget (a layer may hold more or less)

    def select_mask(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                    num_layers: int = 1, capacity: int | None = None, key_valid: torch.Tensor | None = None,
                    prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        """The keep mask the reconstruction chose for these samples (consumed in sample order, layer by layer)."""
        batch, heads, n, _ = keys.shape
        queue = self._masks.get(layer_idx, [])
        if len(queue) < batch:
            raise ValueError("kvzip scores a context by reconstructing it: run it through kvfactory.patch (the "
                             "patched model runs the repeat passes before the prefill)")
        masks = [queue.pop(0) for _ in range(batch)]
        if any(mask.shape[-1] != n for mask in masks):
            raise ValueError(f"kvzip: the reconstruction scored {masks[0].shape[-1]} tokens, the prefill has {n}")
        return torch.stack(masks).to(keys.device)
