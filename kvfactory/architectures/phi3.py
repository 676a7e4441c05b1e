"""Phi-3 adapter: fused ``qkv_proj``, Phi-3's rotary (plain or LongRoPE) and its sliding window."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvfactory.architectures.base import flash_window, split_heads
from kvfactory.architectures.llama import LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    """``Phi3ForCausalLM``: one ``qkv_proj`` split into q (Hq heads), k and v (Hkv heads each); the module's own rotary
    (``Phi3RotaryEmbedding``, or ``Phi3LongRoPEScaledRotaryEmbedding`` with ``rope_scaling.type`` longrope/su, whose
    short/long factor is chosen from the largest position of the call, as in 4.44.2); ``o_proj``.

    ``config.sliding_window`` (Phi-3-mini: 2047) is applied by position at every attention implementation, as
    kvfactory does for Mistral. Stock 4.44.2 applies it only under flash_attention_2, where ``w`` covers distances
    ``<= w`` (:func:`~kvfactory.architectures.base.flash_window`); so beyond the window patched eager/sdpa differ
    from stock eager/sdpa, which ignore it (set ``sliding_window=None`` for that behaviour).
    """

    model_classes = ("Phi3ForCausalLM",)

    def split_projections(self, module: nn.Module, hidden_states: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query_width = module.num_heads * module.head_dim
        key_width = module.num_key_value_heads * module.head_dim
        queries, keys, values = module.qkv_proj(hidden_states).split([query_width, key_width, key_width], dim=-1)
        return (split_heads(queries, module.num_heads, module.head_dim),
                split_heads(keys, module.num_key_value_heads, module.head_dim),
                split_heads(values, module.num_key_value_heads, module.head_dim))

    def sliding_window(self, config: Any) -> int | None:
        return flash_window(getattr(config, "sliding_window", None))
