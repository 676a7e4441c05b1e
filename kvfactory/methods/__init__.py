"""The compression methods, by name: ``get(name, **params)`` builds one, ``names()`` lists them."""
from __future__ import annotations

import dataclasses
import types
import typing
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
    for key, value in params.items():
        _check_type(cls, key, value)
    return cls(**params)


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint`` (None when the hint is not one this checks)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, argument) for argument in arguments]
        return None if any(v is None for v in verdicts) and not any(verdicts) else any(bool(v) for v in verdicts)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        element = arguments[0] if arguments and origin is list else None
        return element is None or all(_matches(item, element) is not False for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return None


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check_type(cls: type[Compressor], key: str, value: Any) -> None:
    """A parameter of the wrong type is an error naming the parameter, the accepted type and the value given."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot evaluate: leave the checks to the method
        return
    if key in hints and _matches(value, hints[key]) is False:
        raise ValueError(f"method {cls.name!r}: {key} must be {_type_name(hints[key])}, got {value!r} "
                         f"({type(value).__name__})")


__all__ = [
    "AdaKV", "AdaPyramidKV", "BudgetedCompressor", "CAM", "HeadKV", "HeadwiseCompressor", "Compressor", "FullKV", "H2O", "Kept", "L2Norm", "PyramidKV", "RandomSelection",
    "Selection", "SnapKV", "StreamingLLM", "WindowedCompressor", "get", "method_class", "names", "parameters",
]
