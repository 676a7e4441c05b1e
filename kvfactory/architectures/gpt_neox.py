"""GPT-NeoX adapter: fused qkv, partial rotary, and 4.44.2's legacy-tuple cache plumbing."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from kvfactory.architectures.base import (
    ArchitectureAdapter, AttentionHost, apply_rotary, merge_heads, rotary_at, warn_attention_weights_unavailable,
)


class GPTNeoXAdapter(ArchitectureAdapter):
    """``GPTNeoXForCausalLM`` (Pythia): ``query_key_value`` fused per head, rotary on the first ``rotary_pct`` of
    each head, ``dense`` output projection. Query and key are cast to the value dtype after rotary (what the stock
    sdpa path does). In 4.44.2 the model only understands tuple caches, so the decoder stack is called without one
    and the layers reach the kvfactory cache through the patch handle."""

    model_classes = ("GPTNeoXForCausalLM",)

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.gpt_neox

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in model.gpt_neox.layers]

    def num_kv_heads(self, config: Any) -> int:
        return config.num_attention_heads

    def project(self, module: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE ``q, k, v (B, H, n, d)``; ``limit``: see :func:`~kvfactory.architectures.base.rotary_at`."""
        batch, n, _ = hidden_states.shape
        heads, head_dim, rotary = module.num_attention_heads, module.head_size, module.rotary_ndims
        qkv = module.query_key_value(hidden_states).view(batch, n, heads, 3 * head_dim).transpose(1, 2)
        queries, keys, values = qkv.split(head_dim, dim=-1)
        held = module.rotary_emb.max_seq_len_cached
        if limit is None:
            limit = int(position_ids.max()) + 1
        cos, sin = module.rotary_emb(values, seq_len=max(limit, held))
        rotated_q, rotated_k = apply_rotary_pos_emb(queries[..., :rotary], keys[..., :rotary], cos, sin, position_ids)
        queries = torch.cat([rotated_q, queries[..., rotary:]], dim=-1).to(values.dtype)
        keys = torch.cat([rotated_k, keys[..., rotary:]], dim=-1).to(values.dtype)
        return queries, keys, values

    def rotate(self, module: nn.Module, states: torch.Tensor, positions: torch.Tensor, inverse: bool = False,
               limit: int | None = None) -> torch.Tensor:
        rotary = module.rotary_ndims
        cos, sin = rotary_at(module.rotary_emb, states, positions, limit)
        rotated = apply_rotary(states[..., :rotary], cos, sin, inverse)
        return torch.cat([rotated, states[..., rotary:]], dim=-1)

    def make_attention_forward(self, handle: AttentionHost, module: nn.Module, layer_idx: int) -> Callable[..., Any]:
        def forward(
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            head_mask: torch.Tensor | None = None,
            layer_past: Any = None,
            use_cache: bool = False,
            output_attentions: bool = False,
        ) -> tuple[Any, ...]:
            if head_mask is not None:
                raise ValueError("kvfactory's patched GPT-NeoX attention does not support head_mask")
            warn_attention_weights_unavailable(output_attentions)
            queries, keys, values = self.project(module, hidden_states, position_ids, handle.position_limit())
            output = module.dense(merge_heads(handle.attend_layer(layer_idx, queries, keys, values, position_ids)))
            return (output, None, None) if output_attentions else (output, None)

        return forward

    def prepare_base_call(self, arguments: dict[str, Any], handle: AttentionHost, new_tokens: int) -> None:
        cache = handle.active_cache
        seen = cache.get_seq_length() if cache is not None else 0
        if arguments.get("position_ids") is None:
            inputs = arguments.get("input_ids")
            if inputs is None:
                inputs = arguments["inputs_embeds"]
            positions = torch.arange(seen, seen + new_tokens, device=inputs.device)
            arguments["position_ids"] = positions.unsqueeze(0).expand(inputs.shape[0], -1)
        # the layers read the cache from the handle and build their own masks: the stack sees a fresh sequence
        arguments["past_key_values"] = None
        arguments["attention_mask"] = None

    def install(self, model: nn.Module, handle: AttentionHost) -> list[Callable[[], None]]:
        """Let ``generate()`` hand a Cache object around, slicing ``input_ids`` by the logical length."""

        def prepare_inputs_for_generation(input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                          **kwargs):
            seen = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
            if seen:
                input_ids = input_ids[:, seen:]
            position_ids = kwargs.get("position_ids")
            if attention_mask is not None and position_ids is None:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids.masked_fill_(attention_mask == 0, 1)
                position_ids = position_ids[:, -input_ids.shape[1]:]
            inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None and not seen else {
                "input_ids": input_ids}
            inputs.update(attention_mask=attention_mask, past_key_values=past_key_values,
                          position_ids=position_ids, use_cache=kwargs.get("use_cache"))
            return inputs

        had_flag = "_supports_cache_class" in model.__dict__
        model._supports_cache_class = True
        model.prepare_inputs_for_generation = prepare_inputs_for_generation

        def undo() -> None:
            del model.prepare_inputs_for_generation
            if not had_flag:
                del model._supports_cache_class

        return [undo]
