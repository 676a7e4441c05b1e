"""The compression methods, by name: ``get(name, **params)`` builds one, ``names()`` lists them."""
from __future__ import annotations

import dataclasses
from typing import Any

from kvfactory.methods.base import BudgetedCompressor, Compressor, Kept, Selection, WindowedCompressor
from kvfactory.methods.adakv import AdaKV, AdaPyramidKV
from kvfactory.methods.cam import CAM
from kvfactory.methods.fullkv import FullKV
from kvfactory.methods.h2o import H2O
from kvfactory.methods.headkv import HeadKV
from kvfactory.methods.headwise import HeadwiseCompressor
from kvfactory.methods.l2norm import L2Norm
from kvfactory.methods.pyramidkv import PyramidKV
from kvfactory.methods.random_selection import RandomSelection
from kvfactory.methods.snapkv import SnapKV
from kvfactory.methods.streamingllm import StreamingLLM

REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (FullKV, RandomSelection, StreamingLLM, SnapKV, PyramidKV, H2O, L2Norm, CAM, AdaKV, AdaPyramidKV, HeadKV)
}
ALIASES = {"full": "fullkv", "streaming": "streamingllm", "ada-snapkv": "adakv"}


def names() -> list[str]:
    """Every method name accepted by :func:`get` (and by ``kvfactory.patch``)."""
    return sorted(REGISTRY)


def method_class(name: str) -> type[Compressor]:
    """The class registered under ``name`` (case-insensitive)."""
    key = name.lower() if isinstance(name, str) else name
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; accepted methods: {', '.join(names())}")
    return REGISTRY[key]


def parameters(name: str) -> list[str]:
    """The parameters method ``name`` accepts."""
    cls = method_class(name)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def get(name: str, **params: Any) -> Compressor:
    """Build the compressor ``name`` with ``params``; unknown parameters are an error, never ignored."""
    cls = method_class(name)
    accepted = parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {cls.name!r} does not accept {', '.join(unknown)}; "
            f"accepted parameters: {', '.join(accepted) if accepted else '(none)'}"
        )
    return cls(**params)


__all__ = [
    "AdaKV", "AdaPyramidKV", "BudgetedCompressor", "CAM", "HeadKV", "HeadwiseCompressor", "Compressor", "FullKV", "H2O", "Kept", "L2Norm", "PyramidKV", "RandomSelection",
    "Selection", "SnapKV", "StreamingLLM", "WindowedCompressor", "get", "method_class", "names", "parameters",
]
