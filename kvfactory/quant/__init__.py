"""Quantized KV storage (KIVI, KVQuant, GEAR) and quantized pruning. Placeholder: being written (issue 4)."""
from __future__ import annotations

from typing import Any

QUANT_PARAMETERS: tuple[str, ...] = ("quant_method",)


def configure(method: Any, params: dict[str, Any], **context: Any) -> tuple[Any, Any]:
    raise NotImplementedError("quantized storage is not available yet")
