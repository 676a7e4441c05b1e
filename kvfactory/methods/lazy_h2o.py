"""LazyH2O: H2O holding a streaming cache, re-selecting its heavy hitters every few steps."""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.methods.base import hold_prefill_budget
from kvfactory.methods.h2o import H2O


@dataclass(kw_only=True)
class LazyH2O(H2O):
    """H2O (Zhang et al. 2023, arXiv:2306.14048) as the streaming project's ``lazy_h2o``: ``start_size`` sinks,
    ``heavy_size`` heavy hitters by accumulated attention and ``recent_size`` recent tokens, evicting only every
    ``update_interval`` decoded tokens. It is a named preset of ``h2o``: start_size = ``sink_size`` (4), recent_size =
    ``window_size`` (252), heavy_size (128) = ``max_capacity_prompt − sink_size − window_size`` (C = 384 by default),
    update_interval = ``compress_interval`` (10): the cache holds between C and C + 9 tokens.

    Parameters
    ----------
    sink_size:
        Sinks (default 4).
    window_size:
        Recent tokens (default 252).
    heavy_size:
        Heavy hitters (default 128); sets ``max_capacity_prompt`` when that is not given.
    compress_interval:
        Evict every this many decoded tokens (default 10, the project's ``update_interval``).
    stream:
        Hold the cache at ``max_capacity_prompt`` while decoding unless ``decode_budget`` is given (default True).
    position_shift:
        Positions inside the cache (StreamingLLM's rolling positions; default False).
    (others):
        As :class:`~kvfactory.methods.h2o.H2O`.
    """

    name = "lazy_h2o"
    sink_size: int = 4
    window_size: int = 252
    heavy_size: int = 128
    compress_interval: int = 10
    stream: bool = True
    position_shift: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.heavy_size, int) or self.heavy_size < 1:
            raise ValueError(f"{self.name}: heavy_size must be a positive integer, got {self.heavy_size!r}")
        if self.max_capacity_prompt is None and self.max_capacity_prompt_ratio is None:
            self.max_capacity_prompt = self.sink_size + self.heavy_size + self.window_size
        super().__post_init__()
        hold_prefill_budget(self, self.stream)
