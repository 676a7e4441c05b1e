"""Qwen2 adapter: Llama-shaped attention with q/k/v biases (the projections carry them) and table-style rotary."""
from __future__ import annotations

from typing import Any

from kvfactory.architectures.base import flash_window
from kvfactory.architectures.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5). Qwen2.5 ships ``use_sliding_window: false``: full attention. With
    ``use_sliding_window`` on, 4.44.2 windows only the layers from ``max_window_layers`` on, and only under
    flash_attention_2; kvfactory applies one window to all layers, so it accepts that setting only when every layer is
    windowed (``max_window_layers == 0``) and says so otherwise."""

    model_classes = ("Qwen2ForCausalLM",)

    def sliding_window(self, config: Any) -> int | None:
        if not getattr(config, "use_sliding_window", False) or config.sliding_window is None:
            return None
        if config.max_window_layers >= config.num_hidden_layers:
            return None  # no layer is windowed
        if config.max_window_layers > 0:
            raise ValueError(
                f"Qwen2 with use_sliding_window and max_window_layers={config.max_window_layers} windows only some "
                f"layers; kvfactory supports a window on all layers (max_window_layers=0) or none "
                f"(use_sliding_window=False, Qwen2.5's setting)")
        return flash_window(config.sliding_window)
