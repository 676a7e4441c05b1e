"""H2O-L2: kvcompress's attention-free H2O (sinks + lowest-norm heavy hitters + recent)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvfactory.methods.l2norm import L2Norm


@dataclass(kw_only=True)
class H2OL2(L2Norm):
    """kvcompress's ``h2o_l2``: H2O's layout (Zhang et al. 2023, arXiv:2306.14048) with the heavy hitters chosen by the
    L2 norm of their keys instead of attention (Devoto et al. 2024, arXiv:2406.11430): ``sink_size`` sinks, the
    ``C − sink_size − window_size`` lowest-norm tokens of the middle, and the last ``window_size`` tokens.
    kvcompress's ``start_size`` / ``heavy_hitter_size`` / ``recent_size`` are ``sink_size`` / ``C − sink − window`` /
    ``window_size``; the default 4 + 64 + 444 = 512.

    Parameters
    ----------
    max_capacity_prompt:
        ``C`` (default 512).
    sink_size:
        Sinks (default 4).
    window_size:
        Recent tokens (default 444).
    skip_layers:
        Layers left uncompressed (default ``[]``).
    decode_budget, compress_interval:
        See :class:`~kvfactory.methods.base.BudgetedCompressor`.
    """

    name = "h2o_l2"
    sink_size: int = 4
    window_size: int = 444
    skip_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.sink_size, int) or self.sink_size < 0:
            raise ValueError(f"h2o_l2: sink_size must be a non-negative integer, got {self.sink_size!r}")
        super().__post_init__()

    def num_sinks(self) -> int:
        return self.sink_size
