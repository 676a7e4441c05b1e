"""Mixtral adapter: Mistral's attention inside a sparse mixture-of-experts block (the MoE is not touched)."""
from __future__ import annotations

from typing import Any

from kvfactory.architectures.base import flash_window
from kvfactory.architectures.llama import LlamaAdapter


class MixtralAdapter(LlamaAdapter):
    """``MixtralForCausalLM``: the attention is Mistral's (q/k/v, GQA, table-style rotary in 4.44.2, the configured
    ``sliding_window`` applied by position at every attention implementation, as kvfactory does for Mistral; stock
    4.44.2 applies it only under flash_attention_2, where a window ``w`` covers distances ``<= w``, see
    :func:`~kvfactory.architectures.base.flash_window`). The router is outside the attention and is not touched."""

    model_classes = ("MixtralForCausalLM",)

    def sliding_window(self, config: Any) -> int | None:
        return flash_window(getattr(config, "sliding_window", None))
