"""Shared machinery of head-wise methods: each KV head keeps its own number of tokens (ragged storage)."""
from __future__ import annotations

from dataclasses import dataclass
import torch

from kvfactory.methods.base import WindowedCompressor, check_shapes
from kvfactory.methods.scoring import PrefillAttention, grouped_logits, pool_scores, reduce_groups


def masked_window_attention(queries: torch.Tensor, keys: torch.Tensor, window_size: int,
                            key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Like :func:`~kvfactory.methods.scoring.window_attention` (fp32 softmax, causal in the window), ignoring
    keys where ``key_valid (B, Hkv, n)`` is False; ``(B, Hkv, g, W, n)`` in the keys' dtype."""
    window = queries[..., -window_size:, :]
    logits = grouped_logits(window, keys).float()
    n, w = keys.shape[-2], window.shape[-2]
    logits[..., n - w:].masked_fill_(torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1), float("-inf"))
    if key_valid is not None:
        logits.masked_fill_(~key_valid[:, :, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).to(keys.dtype)


def keep_top_per_head(past_scores: torch.Tensor, caps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The keep mask ``(B, Hkv, n)``: head ``h`` keeps its ``caps[b, h]`` best past tokens by ``past_scores
    (B, Hkv, P)`` (at most its finite ones) and every token from ``P`` on (the window), where ``valid``."""
    caps = torch.minimum(caps, torch.isfinite(past_scores).sum(-1))
    rank = torch.empty_like(past_scores, dtype=torch.long)
    order = past_scores.sort(dim=-1, descending=True).indices  # KVCF's ranking primitive (ties: sort's order)
    rank.scatter_(-1, order, torch.arange(past_scores.shape[-1], device=past_scores.device).expand_as(order))
    keep = valid.clone()
    keep[..., : past_scores.shape[-1]] &= rank < caps[..., None]
    return keep


class HeadwiseSelection:
    """``select_mask`` of a head-wise method (a mixin): every valid token when the capacity covers the sequence,
    else each KV head's top ``caps`` past tokens by the ``scores`` that :meth:`scores_and_caps` gives, plus the
    window. The class it is mixed into gives ``capacity`` (a Compressor's) and overrides ``scores_and_caps``."""

    def scores_and_caps(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, capacity: int,
                        layer_idx: int, num_layers: int, key_valid: torch.Tensor | None,
                        prefill_attention: PrefillAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Past-token scores ``(B, Hkv, n - W)`` (invalid slots -inf) and each head's past cap ``(B, Hkv)``."""
        raise NotImplementedError

    def select_mask(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                    num_layers: int = 1, capacity: int | None = None, key_valid: torch.Tensor | None = None,
                    prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        """Boolean ``(B, Hkv, n)``: the tokens kept (all of them when the capacity covers the sequence)."""
        batch, heads, n, _ = keys.shape
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, n)  # type: ignore[attr-defined]  # the Compressor's
        valid = key_valid if key_valid is not None else torch.ones(batch, heads, n, dtype=torch.bool,
                                                                   device=keys.device)
        if capacity >= n:
            return valid.clone()
        scores, caps = self.scores_and_caps(queries, keys, values, capacity=capacity, layer_idx=layer_idx,
                                            num_layers=num_layers, key_valid=key_valid,
                                            prefill_attention=prefill_attention)
        return keep_top_per_head(scores, caps, valid)


@dataclass(kw_only=True)
class HeadwiseCompressor(HeadwiseSelection, WindowedCompressor):
    """Base of head-wise methods: SnapKV-style scores averaged over the window (not summed), then per-head caps.

    ``select_mask`` returns the kept tokens as a boolean mask ``(B, Hkv, n)``; ``compress`` returns the kept keys and
    values flattened head after head, ``(N, d)``, since heads keep different counts.
    """

    kernel_size: int = 7
    pooling: str = "maxpool"
    layout = "ragged"
    scores_with_queries = True

    def past_scores(self, queries: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None
                    ) -> torch.Tensor:
        """Pooled mean window attention of every past token, ``(B, Hkv, n - W)`` fp32; invalid slots are -inf."""
        past = keys.shape[-2] - self.window_size
        attention = masked_window_attention(queries, keys, self.window_size, key_valid)[..., :past]
        scores = pool_scores(reduce_groups(attention.mean(dim=-2), self.gqa_score_agg).float(), self.kernel_size,
                             self.pooling)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[..., :past], float("-inf"))
        return scores

    def head_caps(self, past_scores: torch.Tensor, capacity: int, layer_idx: int, num_layers: int,
                  num_query_heads: int) -> torch.Tensor:
        """Past tokens each head keeps, ``(B, Hkv)`` int64."""
        raise NotImplementedError

    def scores_and_caps(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, capacity: int,
                        layer_idx: int, num_layers: int, key_valid: torch.Tensor | None,
                        prefill_attention: PrefillAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.past_scores(queries, keys, key_valid)
        return scores, self.head_caps(scores, capacity, layer_idx, num_layers, queries.shape[1])

    def compress(self, query_states: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                 layer_idx: int = 0, num_layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept keys/values flattened in (sample, head, position) order, ``(N, d)`` each."""
        check_shapes(query_states, key_states, value_states)
        keep = self.select_mask(query_states, key_states, value_states, layer_idx=layer_idx, num_layers=num_layers)
        return key_states[keep], value_states[keep]
