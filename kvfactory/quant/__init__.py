"""Quantized KV storage under any eviction method: ``kvfactory.patch(model, method, quant_method=..., nbits=...)``.

Quantizers by name (``get(name, **params)``, ``names()``): ``kivi``, ``kvquant``, ``gear``, ``layerquant``.
:func:`configure` (called by ``kvfactory.patch``) turns the quantization parameters into the cache's storage
(:class:`~kvfactory.storage.quantized.QuantizedStorage`) and, for quantized pruning, wraps the method so its budget
counts memory (:class:`~kvfactory.quant.budget.MemoryBudget`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvfactory.methods.base import BudgetedCompressor, Compressor
from kvfactory.quant.base import KVQuantizer
from kvfactory.quant.budget import MemoryBudget, tokens_for_memory
from kvfactory.quant.gear import GEAR
from kvfactory.quant.kivi import KIVI
from kvfactory.quant.kvquant import KVQuant
from kvfactory.quant.layerquant import LayerQuant
from kvfactory.storage.base import Rotary

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


def configure(method: Compressor, params: dict[str, Any], *, rotary: Rotary | None, num_layers: int, config: Any,
              dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The storage quantizing what ``method`` keeps, and the method itself (wrapped for quantized pruning).

    ``params`` holds ``quant_method`` and the quantizer's parameters; ``rotary`` is the model's RoPE by layer
    (KVQuant), ``dtype`` the model's (the residual's, for the byte arithmetic of quantized pruning).
    """
    from kvfactory.storage.quantized import QuantizedStorage  # it imports kvfactory.quant.base

    params = dict(params)
    quantizer = get(params.pop("quant_method"), **params)
    if getattr(method, "headwise", False):
        raise ValueError(f"quant_method {quantizer.name!r} cannot quantize the head-wise method {method.name!r}: its "
                         "ragged storage is full precision only; use a method with per-layer budgets")
    heads, head_dim = kv_shape(config)
    quantizer.check_head_dim(head_dim)
    layers = [quantizer.for_layer(layer, num_layers) for layer in range(num_layers)]
    storage = QuantizedStorage(layers, rotary, quantizer.describe())
    if quantizer.quant_pruning:
        if not isinstance(method, BudgetedCompressor):
            raise ValueError(f"quant_pruning spends a token budget as memory; method {method.name!r} has no budget "
                             "(use e.g. snapkv with max_capacity_prompt)")
        dtype_bytes = torch.empty(0, dtype=dtype).element_size()
        method = MemoryBudget(method, lambda layer, capacity: tokens_for_memory(
            capacity, layers[layer], heads, head_dim, dtype_bytes))
    return storage, method


__all__ = ["GEAR", "KIVI", "KVQuant", "KVQuantizer", "LayerQuant", "MemoryBudget", "QUANT_PARAMETERS", "configure",
           "get", "names", "parameters", "tokens_for_memory"]
