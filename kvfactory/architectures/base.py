"""What an architecture adapter knows: where the attention modules are, how they project q/k/v (with RoPE), and
how their forward is called and must answer. Nothing about compression lives here."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from kvfactory.patching import PatchHandle

logger = logging.getLogger(__name__)


class ArchitectureAdapter:
    """Base adapter. Subclasses implement ``project`` and ``make_attention_forward``."""

    model_classes: ClassVar[tuple[str, ...]] = ()

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack whose forward receives ``past_key_values`` (``model.model`` for Llama/Mistral)."""
        return model.model

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.base_model(model).layers]

    def sliding_window(self, config: Any) -> int | None:
        return None

    def num_kv_heads(self, config: Any) -> int:
        return config.num_key_value_heads

    def make_attention_forward(self, handle: "PatchHandle", module: nn.Module, layer_idx: int) -> Callable[..., Any]:
        raise NotImplementedError

    def rotate(self, module: nn.Module, states: torch.Tensor, positions: torch.Tensor, inverse: bool = False
               ) -> torch.Tensor:
        """Apply (or undo, ``inverse``) the module's RoPE to ``states (B, H, T, d)`` at ``positions (B, H, T)``."""
        raise NotImplementedError

    def prepare_base_call(self, arguments: dict[str, Any], handle: "PatchHandle", new_tokens: int) -> None:
        """Adjust the decoder stack's call arguments (the cache is in ``handle``'s step context)."""

    def install(self, model: nn.Module, handle: "PatchHandle") -> list[Callable[[], None]]:
        """Model-level changes beyond the attention forwards; returns the functions that undo them."""
        return []


def split_heads(states: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """``(B, n, H·d)`` → ``(B, H, n, d)``."""
    batch, n, _ = states.shape
    return states.view(batch, n, num_heads, head_dim).transpose(1, 2)


def merge_heads(states: torch.Tensor) -> torch.Tensor:
    """``(B, H, n, d)`` → ``(B, n, H·d)``."""
    batch, heads, n, head_dim = states.shape
    return states.transpose(1, 2).reshape(batch, n, heads * head_dim)


def warn_attention_weights_unavailable(output_attentions: bool) -> None:
    if output_attentions:
        logger.warning("output_attentions=True: kvfactory's patched attention does not return attention weights")
