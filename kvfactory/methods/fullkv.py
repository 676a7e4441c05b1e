"""FullKV: the uncompressed baseline."""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.methods.base import Compressor


@dataclass(kw_only=True)
class FullKV(Compressor):
    """Keeps every token: the reference every method is measured against.

    Runs through the same patched attention path and cache as the other methods, so its logits equal the unpatched
    model's and its bytes/latency are the honest baseline. No parameters.
    """

    name = "fullkv"
