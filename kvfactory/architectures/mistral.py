"""Mistral adapter: Llama's projections, RoPE computed inside the attention, and the sliding window."""
from __future__ import annotations

from typing import Any

from kvfactory.architectures.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    """``MistralForCausalLM`` (4.44.2 passes no ``position_embeddings``: the module's own rotary is used).

    With ``config.sliding_window`` set, a query at position ``p`` attends only keys at positions ``> p - window``,
    applied by position, so it stays right after eviction.
    """

    model_classes = ("MistralForCausalLM",)

    def sliding_window(self, config: Any) -> int | None:
        return getattr(config, "sliding_window", None)
