"""kvfactory: KV-cache compression for Hugging Face causal LMs, and the benchmarks to judge it.

Public face (imported lazily so that light submodules such as ``kvfactory.metrics`` load without torch):

- ``kvfactory.patch(model, method, **params) -> PatchHandle``: run a compression method inside a loaded model.
- ``kvfactory.methods.get(name, **params)`` / ``kvfactory.methods.names()``: the compressors.
- ``kvfactory.cache_nbytes(past_key_values) -> int``: the real bytes a cache holds.
- ``kvfactory.models.load(name_or_path, **kw) -> (model, tokenizer)``: checkpoints, the embedded SmolLM2, random configs.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "patch": ("kvfactory.patching", "patch"),
    "PatchHandle": ("kvfactory.patching", "PatchHandle"),
    "CompressedCache": ("kvfactory.cache", "CompressedCache"),
    "cache_nbytes": ("kvfactory.cache", "cache_nbytes"),
}
#: Submodules reachable as attributes (``kvfactory.generation.answer_on_compressed_context`` as the README writes it).
_LAZY_MODULES = {"methods", "models", "generation", "cache", "patching", "attention", "quant", "storage", "metrics",
                 "benchmarks", "plots", "paths", "retrieval_heads", "architectures", "embedded"}

__all__ = ["patch", "PatchHandle", "CompressedCache", "cache_nbytes", "methods", "models", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return import_module(f"kvfactory.{name}")
    if name in _LAZY_ATTRIBUTES:
        module_name, attribute = _LAZY_ATTRIBUTES[name]
        return getattr(import_module(module_name), attribute)
    raise AttributeError(f"module 'kvfactory' has no attribute {name!r}")
