"""The compression methods, by name: ``get(name, **params)`` builds one, ``names()`` lists them.

Besides a method's own parameters, ``get`` (and so ``kvfactory.patch`` and the runners' ``--method_kwargs``) accepts
the composition keywords of :data:`COMPOSITION_PARAMETERS`, each turned into a wrapper of
:mod:`kvfactory.methods.wrappers` (see its docstring): ``scorer=`` (AdaKV's head-wise allocation over any scorer),
a list or function as ``max_capacity_prompt`` (one budget per layer), ``decode_method=`` / ``decode_method_kwargs=``
(another method re-applied while decoding, at ``decode_budget``), ``prefill_chunk_size=`` (prefill in chunks,
compressing after each), ``prune_after=`` (keep sequences of at most that many tokens whole, kvcompress's option), and the quantization parameters of
:mod:`kvfactory.quant` (``quant_method``, ``nbits``, ...).
"""
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
from kvfactory.methods.adaptive_l2 import AdaptiveL2
from kvfactory.methods.fix_size_l2 import FixSizeL2
from kvfactory.methods.h2o_l2 import H2OL2
from kvfactory.methods.knorm import KNorm
from kvfactory.methods.lagkv import LagKV
from kvfactory.methods.lazy_h2o import LazyH2O
from kvfactory.methods.recent_only import RecentOnly
from kvfactory.methods.sepllm import SepLLM
from kvfactory.methods.snapkv_lite import SnapKVLite
from kvfactory.methods.unified import LazyUnified, Unified
# issue 17: the methods of 2025-26 papers (kvpress's list)
from kvfactory.methods.chunkkv import ChunkKV
from kvfactory.methods.criticalkv import CriticalKV
from kvfactory.methods.duo_attention import DuoAttention
from kvfactory.methods.expected_attention import ExpectedAttention
from kvfactory.methods.keydiff import KeyDiff
from kvfactory.methods.over_scorer import OverScorer
from kvfactory.methods.kvzip import KVzip
from kvfactory.methods.quest import Quest
from kvfactory.methods.simlayerkv import SimLayerKV
from kvfactory.methods.think import ThinK
from kvfactory.methods.tova import TOVA
from kvfactory.methods.wrappers import (
    ChunkedPrefill, DecodingPolicy, HeadwiseAllocation, MethodWrapper, PerLayerBudget, PruneAfter, Quantized,
)
from kvfactory import quant

REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (FullKV, RandomSelection, StreamingLLM, SnapKV, PyramidKV, H2O, L2Norm, CAM, AdaKV, AdaPyramidKV, HeadKV)
}
# the predecessors' methods (streaming project, KVPress-style experiment, kvcompress): docs/predecessors.md
REGISTRY.update({cls.name: cls for cls in (SepLLM, Unified, LazyUnified, LazyH2O, LagKV, KNorm, FixSizeL2, H2OL2,
                                           SnapKVLite, AdaptiveL2, RecentOnly)})
REGISTRY.update({cls.name: cls for cls in (  # issue 17
    TOVA, ExpectedAttention, KVzip, DuoAttention, CriticalKV, KeyDiff, ThinK, Quest, ChunkKV, SimLayerKV,
)})
ALIASES = {"full": "fullkv", "streaming": "streamingllm", "ada-snapkv": "adakv"}
# head-wise allocations that take scorer=: the method name -> the parameters that belong to the allocation
ALLOCATIONS: dict[str, tuple[str, ...]] = {"adakv": ("floor_ratio", "normalize")}
COMPOSITION_PARAMETERS = ("scorer", "decode_method", "decode_method_kwargs", "prefill_chunk_size", "prune_after",
                          *quant.QUANT_PARAMETERS)


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


def _build(name: str, params: dict[str, Any], extra_accepted: tuple[str, ...] = ()) -> Compressor:
    cls = method_class(name)
    accepted = parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {cls.name!r} does not accept {', '.join(unknown)}; "
            f"accepted parameters: {', '.join(accepted + list(extra_accepted)) if accepted else '(none)'}"
        )
    for key, value in params.items():
        _check_type(cls, key, value)
    method = cls(**params)
    if isinstance(method, OverScorer):  # CriticalKV, ChunkKV: a rule over another method's scores
        method.bind_scorer(_build(method.base, dict(method.base_kwargs or {})))
    if isinstance(method, ThinK) and method.token_method is not None:  # ThinK over a token method
        method.bind_token_method(_build(method.token_method, method.token_method_params()))
    return method


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


def wrap(method: Compressor, **params: Any) -> Compressor:
    """``method`` quantized when ``params`` name a ``quant_method`` (the only composition of a built method)."""
    unknown = sorted(set(params) - set(quant.QUANT_PARAMETERS))
    if unknown:
        raise ValueError("pass parameters either in the compressor instance or as keyword arguments, not both "
                         f"(got {', '.join(unknown)}); quantization parameters may be added to an instance")
    quant_method = params.pop("quant_method", None)
    if quant_method in (None, "", "none"):
        if params:
            raise ValueError(f"{', '.join(sorted(params))} given without quant_method; set quant_method or drop them")
        return method
    return Quantized(method, quant.get(quant_method, **params))


def get(name: str, **params: Any) -> Compressor:
    """Build the compressor ``name`` with ``params``; unknown parameters are an error, never ignored. The
    composition keywords (module docstring) wrap it."""
    params = dict(params)
    quant_params = {key: params.pop(key) for key in list(params) if key in quant.QUANT_PARAMETERS}
    scorer = params.pop("scorer", None)
    decode_method = params.pop("decode_method", None)
    decode_kwargs = params.pop("decode_method_kwargs", None) or {}
    chunk_size = params.pop("prefill_chunk_size", None)
    prune_after = params.pop("prune_after", None)
    per_layer = None
    if isinstance(params.get("max_capacity_prompt"), (list, tuple)) or callable(params.get("max_capacity_prompt")):
        per_layer = params.pop("max_capacity_prompt")
    if decode_method is None and decode_kwargs:
        raise ValueError("decode_method_kwargs given without decode_method")
    decoding = {}
    if decode_method is not None:
        decoding = {key: params.pop(key) for key in ("decode_budget", "compress_interval") if key in params}
        if "decode_budget" not in decoding:
            raise ValueError(f"decode_method={decode_method!r} needs decode_budget (tokens kept while decoding)")
    allocation: dict[str, Any] = {}
    if scorer is not None:
        key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
        if key not in ALLOCATIONS:
            raise ValueError(f"scorer= chooses the scores of a head-wise allocation; accepted by "
                             f"{', '.join(sorted(ALLOCATIONS))}, not {name!r}")
        allocation = {k: params.pop(k) for k in ALLOCATIONS[key] if k in params}
        if method_class(scorer).layout != "dense":
            raise ValueError(f"scorer {scorer!r} is itself head-wise; use a per-token scorer: "
                             + ", ".join(n for n in names() if REGISTRY[n].layout == "dense" and n != "fullkv"))
        method = _build(scorer, params, ALLOCATIONS[key])
    else:
        method = _build(name, params)
    if per_layer is not None:
        method = PerLayerBudget(method, per_layer)
    if scorer is not None:
        method = HeadwiseAllocation(method, **allocation)
    if decode_method is not None:
        method = DecodingPolicy(method, decoding["decode_budget"], decoding.get("compress_interval", 1),
                                _build(decode_method, dict(decode_kwargs)))
    if chunk_size is not None:
        method = ChunkedPrefill(method, chunk_size)
    if prune_after is not None:
        method = PruneAfter(method, prune_after)
    return wrap(method, **quant_params)


__all__ = [
    "COMPOSITION_PARAMETERS", "ChunkedPrefill", "DecodingPolicy", "HeadwiseAllocation", "MethodWrapper", "PerLayerBudget", "Quantized",
    "wrap", "AdaKV", "AdaPyramidKV", "BudgetedCompressor", "CAM", "HeadKV", "HeadwiseCompressor", "Compressor", "FullKV", "H2O", "Kept", "L2Norm", "PyramidKV", "RandomSelection",
    "Selection", "SnapKV", "StreamingLLM", "WindowedCompressor", "get", "method_class", "names", "parameters",
]
__all__ += ["PruneAfter"]  # kvcompress's prune_after, over any method
__all__ += ["AdaptiveL2", "FixSizeL2", "H2OL2", "KNorm", "LagKV", "LazyH2O", "LazyUnified", "RecentOnly", "SepLLM",
            "SnapKVLite", "Unified"]
__all__ += ["ChunkKV", "CriticalKV", "DuoAttention", "ExpectedAttention", "KeyDiff", "KVzip", "OverScorer", "Quest", "SimLayerKV",
            "ThinK", "TOVA"]  # issue 17
