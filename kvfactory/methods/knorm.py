"""KNorm: kvpress's name for the L2-norm method, with kvpress's ``compression_ratio`` (fraction removed)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvfactory.methods.l2norm import L2Norm
from kvfactory.methods.press_ratio import PressRatio


@dataclass(kw_only=True)
class KNorm(PressRatio, L2Norm):
    """kvpress's ``KnormPress`` (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", arXiv:2406.11430): score ``−‖k‖``, keep the ``max(1, int(n · (1 − compression_ratio)))`` tokens
    with the lowest key norms, in every layer, with no protected window (kvpress's ``ScorerPress``).

    Same scoring as ``l2norm``; what differs is the budget convention and the defaults (kvpress compresses every
    layer). ``knorm`` at ``compression_ratio=0.1`` keeps 90% of the prompt; ``l2norm`` at
    ``max_capacity_prompt_ratio=0.1`` keeps 10%.

    Parameters
    ----------
    compression_ratio:
        Fraction of the prompt removed (kvpress's convention), default 0.5 when no kvfactory budget is given.
    max_capacity_prompt, max_capacity_prompt_ratio:
        kvfactory's budgets (tokens kept, or fraction kept) instead of ``compression_ratio``.
    skip_layers:
        Layers left uncompressed (default ``[]``: kvpress compresses all of them).
    window_size:
        Recent tokens always kept (default 0, as kvpress).
    decode_budget, compress_interval, gqa_score_agg:
        See :class:`~kvfactory.methods.base.WindowedCompressor`.
    """

    name = "knorm"
    skip_layers: list[int] = field(default_factory=list)
