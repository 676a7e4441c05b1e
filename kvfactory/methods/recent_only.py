"""Recent-only: the last tokens and nothing else (kvcompress's control)."""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.methods.streamingllm import StreamingLLM


@dataclass(kw_only=True)
class RecentOnly(StreamingLLM):
    """Keeps the last ``C`` tokens only: StreamingLLM without sinks (kvcompress's ``recent_only`` control; the
    ablation of Xiao et al. 2023, arXiv:2309.17453, that shows why the sinks matter).

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, kvcompress's ``window_size`` (default 512).
    sink_size:
        Default 0 (no sinks).
    position_shift, decode_budget, compress_interval:
        As :class:`~kvfactory.methods.streamingllm.StreamingLLM`.
    """

    name = "recent_only"
    sink_size: int = 0
