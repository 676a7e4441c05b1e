"""The architecture registry: one adapter per model family (one small file each, one line here).

An adapter knows where a model's attention modules are and how they project q/k/v with RoPE; nothing about
compression. Adding an architecture is a file beside these and its instance in :data:`ADAPTERS` (the tests derive
their architecture list from this registry and ``kvfactory.models``' ``tiny-*`` configs).
"""
from __future__ import annotations

from torch import nn

from kvfactory.architectures.base import ArchitectureAdapter
from kvfactory.architectures.gpt_neox import GPTNeoXAdapter
from kvfactory.architectures.llama import LlamaAdapter
from kvfactory.architectures.mistral import MistralAdapter
from kvfactory.architectures.mixtral import MixtralAdapter
from kvfactory.architectures.phi3 import Phi3Adapter
from kvfactory.architectures.qwen2 import Qwen2Adapter

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    LlamaAdapter(), MistralAdapter(), MixtralAdapter(), Qwen2Adapter(), Phi3Adapter(), GPTNeoXAdapter(),
)


def supported_architectures() -> list[str]:
    """The model classes kvfactory patches."""
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model``'s class (exact class name match, subclasses by their bases)."""
    for cls in type(model).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.model_classes:
                return adapter
    raise ValueError(
        f"unsupported model {type(model).__name__}; kvfactory patches {', '.join(supported_architectures())}"
    )
