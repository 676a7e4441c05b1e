"""H2O: heavy hitters by accumulated attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.methods.base import Selection, WindowedCompressor, top_past_plus_window
from kvfactory.methods.scoring import PrefillAttention, causal_column_sums, reduce_groups


@dataclass(kw_only=True)
class H2O(WindowedCompressor):
    """Keeps the tokens with the largest accumulated attention plus the most recent ones (Zhang et al. 2023,
    "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", arXiv:2306.14048).

    Prefill: score = column sums of the full causal attention of every prompt query (computed over query chunks,
    summed in fp32, no ``n × n`` buffer), reduced over the query group; keep the top ``C - W`` past tokens plus the
    last ``W``. Decoding with ``decode_budget``: true H2O, every generated token adds its attention to the
    accumulators and the lowest-scoring non-recent token is evicted.

    Parameters
    ----------
    window_size:
        Recent tokens always kept (default 8, KVCache-Factory's runner value; the H2O paper splits C evenly).
    sink_size:
        Leading tokens always kept (default 0; streaming setups use 4).
    merge:
        ``None``, ``"pivot"`` or ``"weighted"``.
    (others):
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "h2o"
    sink_size: int = 0
    merge: str | None = None
    uses_prefill_attention = True

    def __post_init__(self) -> None:
        if not isinstance(self.sink_size, int) or self.sink_size < 0:
            raise ValueError(f"h2o: sink_size must be a non-negative integer, got {self.sink_size!r}")
        super().__post_init__()

    def num_sinks(self) -> int:
        return self.sink_size

    def token_scores(self, queries: torch.Tensor, keys: torch.Tensor,
                     prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        """Accumulated attention ``(B, Hkv, n)`` each prompt token received."""
        return reduce_groups(causal_column_sums(queries, keys, prefill_attention), self.gqa_score_agg)

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        scores = accumulated if accumulated is not None else self.token_scores(queries, keys, prefill_attention)
        past = keys.shape[-2] - self.window_size
        indices = top_past_plus_window(scores[..., :past], capacity, self.window_size, self.sink_size)
        return Selection(indices, scores.gather(2, indices))

    def past_token_scores(self, queries, keys, values, *, layer_idx, prefill_attention=None) -> torch.Tensor:
        return self.token_scores(queries, keys, prefill_attention)[..., : keys.shape[-2] - self.window_size]

    @property
    def needs_decode_attention(self) -> bool:
        return self.decode_budget is not None
