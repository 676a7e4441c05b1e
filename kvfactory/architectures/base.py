"""What an architecture adapter knows: where the attention modules are, how they project q/k/v (with RoPE), and
how their forward is called and must answer. Nothing about compression lives here."""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LengthHolder(Protocol):
    """What an adapter reads of the cache in flight: its logical length."""

    def get_seq_length(self, layer_idx: int | None = 0) -> int: ...


class AttentionHost(Protocol):
    """What an adapter's forwards need from the object that patched the model (``kvfactory.patching.PatchHandle``):
    the attention of one layer's new tokens and the cache of the forward in flight. A Protocol, so the adapters never
    import the patching module (which imports them)."""

    @property
    def active_cache(self) -> LengthHolder | None: ...

    def position_limit(self) -> int | None:
        """A host-side bound (exclusive) on the positions of the forward in flight (None outside a forward)."""
        ...

    def attend_layer(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     position_ids: torch.Tensor | None) -> torch.Tensor: ...


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

    def make_attention_forward(self, handle: AttentionHost, module: nn.Module, layer_idx: int) -> Callable[..., Any]:
        raise NotImplementedError

    def rotate(self, module: nn.Module, states: torch.Tensor, positions: torch.Tensor, inverse: bool = False,
               limit: int | None = None) -> torch.Tensor:
        """Apply (or undo, ``inverse``) the module's RoPE to ``states (B, H, T, d)`` at ``positions (B, H, T)``
        (``limit``: a host-side bound on the positions, see :func:`rotary_at`)."""
        raise NotImplementedError

    def prepare_base_call(self, arguments: dict[str, Any], handle: AttentionHost, new_tokens: int) -> None:
        """Adjust the decoder stack's call arguments (the cache is in ``handle``'s step context)."""

    def install(self, model: nn.Module, handle: AttentionHost) -> list[Callable[[], None]]:
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


def flash_window(window: int | None) -> int | None:
    """kvfactory's window ``w`` lets a query see keys at distance ``< w`` (Mistral's eager/sdpa mask in 4.44.2). The
    flash-attn path of 4.44.2 (``window_size=(w, w)``) sees distance ``<= w``; the models windowed only on that path
    (Phi-3, Mixtral, Qwen2) therefore get ``w + 1``."""
    return None if window is None else window + 1


def rotate_half(states: torch.Tensor) -> torch.Tensor:
    """``[x1, x2]`` → ``[-x2, x1]`` over the last dimension (every RoPE model of transformers 4.44.2)."""
    first, second = states.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE (or its inverse) with ``cos``/``sin`` broadcastable to ``states``."""
    return states * cos + rotate_half(states) * (-sin if inverse else sin)


def rotary_at(rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor, limit: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` at ``positions`` (any shape; result ``positions.shape + (d,)``) from a rotary module of one of two
    kinds in 4.44.2: table-style ``forward(x, seq_len)`` returning the first ``seq_len`` rows (Qwen2, Mixtral,
    GPT-NeoX), or position-style ``forward(x, position_ids (B, T))`` (Llama, Mistral, Phi-3).

    ``limit`` is a host-side bound (exclusive) on ``positions``, the logical length after this step, which the stock
    models pass as ``seq_len``: a table is asked for ``max(limit, rows it already holds)``, the same rows and the
    same growth (dynamic NTK included) as stock, without reading ``positions`` on the host (a device sync per
    layer). Without a limit the positions' maximum is read (one sync)."""
    index = positions.clamp_min(0).long()
    if _takes_position_ids(type(rotary)):
        flat = index.reshape(-1, index.shape[-1])
        cos, sin = rotary(like, flat)
        return cos.view(*index.shape, -1), sin.view(*index.shape, -1)
    held = getattr(rotary, "max_seq_len_cached", None)
    if limit is None or held is None:
        limit = int(index.max()) + 1
    cos, sin = rotary(like, seq_len=max(limit, held or 0))
    return cos[index].to(like.dtype), sin[index].to(like.dtype)


@functools.lru_cache(maxsize=None)
def _takes_position_ids(rotary_class: type) -> bool:
    return "position_ids" in inspect.signature(rotary_class.forward).parameters


def warn_attention_weights_unavailable(output_attentions: bool) -> None:
    if output_attentions:
        logger.warning("output_attentions=True: kvfactory's patched attention does not return attention weights")
