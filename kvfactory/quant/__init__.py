"""KV quantizers: ``kvfactory.patch(model, method, quant_method=..., nbits=...)`` quantizes what any method keeps.

Quantizers by name (``get(name, **params)``, ``names()``): ``kivi``, ``kvquant``, ``gear``, ``layerquant``. This
package knows nothing of methods or storage: the quantization wrapper
(:class:`~kvfactory.methods.wrappers.Quantized`) turns a quantizer into the cache's storage
(:class:`~kvfactory.storage.quantized.QuantizedStorage`) and, for quantized pruning, converts the method's budget
into memory (:func:`~kvfactory.quant.budget.tokens_for_memory`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from kvfactory.quant.base import KVQuantizer
from kvfactory.quant.budget import tokens_for_memory
from kvfactory.quant.gear import GEAR
from kvfactory.quant.kivi import KIVI
from kvfactory.quant.kvquant import KVQuant
from kvfactory.quant.layerquant import LayerQuant

QUANTIZERS: dict[str, type[KVQuantizer]] = {cls.name: cls for cls in (KIVI, KVQuant, GEAR, LayerQuant)}


def names() -> list[str]:
    """Every quantizer name accepted as ``quant_method``."""
    return sorted(QUANTIZERS)


def quantizer_class(name: str) -> type[KVQuantizer]:
    key = name.lower() if isinstance(name, str) else name
    if key not in QUANTIZERS:
        raise ValueError(f"unknown quant_method {name!r}; accepted: {', '.join(names())} (or none)")
    return QUANTIZERS[key]


def parameters(name: str) -> list[str]:
    """The parameters quantizer ``name`` accepts."""
    return [f.name for f in dataclasses.fields(quantizer_class(name))]


# every name kvfactory.patch routes here rather than to the method
QUANT_PARAMETERS: tuple[str, ...] = ("quant_method", *sorted({p for name in QUANTIZERS for p in parameters(name)}))


def get(name: str, **params: Any) -> KVQuantizer:
    """Build quantizer ``name``; unknown parameters are an error, never ignored (``nbits=None``: the default)."""
    cls = quantizer_class(name)
    params = {key: value for key, value in params.items() if not (key == "nbits" and value is None)}
    unknown = sorted(set(params) - set(parameters(name)))
    if unknown:
        raise ValueError(f"quant_method {cls.name!r} does not accept {', '.join(unknown)}; "
                         f"accepted: {', '.join(parameters(name))}")
    return cls(**params)


def kv_shape(config: Any) -> tuple[int, int]:
    """KV heads and head dimension of a model config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


__all__ = ["GEAR", "KIVI", "KVQuant", "KVQuantizer", "LayerQuant", "QUANT_PARAMETERS", "get", "kv_shape", "names",
           "parameters", "tokens_for_memory"]
