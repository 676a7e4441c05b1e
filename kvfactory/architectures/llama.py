"""Llama adapter (``LlamaForCausalLM``, transformers 4.44.2): q/k/v projections, RoPE, output projection.

The other Llama-shaped attentions (Mistral, Mixtral, Qwen2, Phi-3) reuse its forward and override only what differs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from kvfactory.architectures.base import (
    ArchitectureAdapter, AttentionHost, apply_rotary, merge_heads, rotary_at, split_heads,
    warn_attention_weights_unavailable,
)


class LlamaAdapter(ArchitectureAdapter):
    """Llama-style attention: separate q/k/v projections, rotary on the full head, ``o_proj``.

    ``pretraining_tp > 1`` (sliced projections) is computed as one plain linear layer: the same function.
    """

    model_classes = ("LlamaForCausalLM",)

    def split_projections(self, module: nn.Module, hidden_states: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE ``q (B, Hq, n, d)`` and ``k, v (B, Hkv, n, d)``."""
        queries = split_heads(module.q_proj(hidden_states), module.num_heads, module.head_dim)
        keys = split_heads(module.k_proj(hidden_states), module.num_key_value_heads, module.head_dim)
        values = split_heads(module.v_proj(hidden_states), module.num_key_value_heads, module.head_dim)
        return queries, keys, values

    def project(
        self, module: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, limit: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE ``q (B, Hq, n, d)`` and ``k, v (B, Hkv, n, d)``; ``limit``: see
        :func:`~kvfactory.architectures.base.rotary_at`."""
        queries, keys, values = self.split_projections(module, hidden_states)
        if position_embeddings is not None:
            cos, sin = position_embeddings
        else:
            cos, sin = rotary_at(module.rotary_emb, values, position_ids, limit)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return apply_rotary(queries, cos, sin), apply_rotary(keys, cos, sin), values

    def rotate(self, module: nn.Module, states: torch.Tensor, positions: torch.Tensor, inverse: bool = False,
               limit: int | None = None) -> torch.Tensor:
        cos, sin = rotary_at(module.rotary_emb, states, positions, limit)
        return apply_rotary(states, cos, sin, inverse)

    def make_attention_forward(self, handle: AttentionHost, module: nn.Module, layer_idx: int) -> Callable[..., Any]:
        def forward(
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            past_key_value: Any = None,
            output_attentions: bool = False,
            use_cache: bool = False,
            cache_position: torch.LongTensor | None = None,
            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None, Any]:
            warn_attention_weights_unavailable(output_attentions)
            queries, keys, values = self.project(module, hidden_states, position_ids, position_embeddings,
                                                 handle.position_limit())
            output = handle.attend_layer(layer_idx, queries, keys, values, position_ids)
            return module.o_proj(merge_heads(output)), None, past_key_value

        return forward
