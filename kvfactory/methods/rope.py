"""RoPE access for methods that reason about pre-rotation queries/keys (Expected Attention, DuoAttention's
on-the-fly pattern).

Inside ``kvfactory.patch`` the model's own rotary is used (``PatchHandle.rotate``, every adapter's, partial rotary
included); a method used on bare tensors falls back to the standard ``rotate_half`` RoPE with base ``rope_theta``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Rotate = Callable[[int, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def standard_rotate(theta: float) -> Rotate:
    """``rotate(layer_idx, states (..., T, d), positions (..., T), inverse)`` for Llama-style RoPE of base ``theta``."""

    def rotate(layer_idx: int, states: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        dim = states.shape[-1]
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=states.device) / dim)
        angles = positions.float()[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        first, second = states.float().chunk(2, dim=-1)
        rotated_half = torch.cat([-second, first], dim=-1)
        return (states.float() * cos + rotated_half * (-sin if inverse else sin)).to(states.dtype)

    return rotate


def handle_rotate(handle: Any) -> Rotate:
    """The patched model's RoPE (``PatchHandle.rotate``)."""
    return lambda layer_idx, states, positions, inverse=False: handle.rotate(layer_idx, states, positions, inverse)


def unrotate_queries(rotate: Rotate, layer_idx: int, queries: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Pre-RoPE queries ``(B, H, n_q, d)`` fp32, the queries taken at positions ``[n_keys - n_q, n_keys)`` (exact
    for a prompt attending to itself; an approximation for a decode-time window after eviction)."""
    n_q = queries.shape[-2]
    positions = torch.arange(n_keys - n_q, n_keys, device=queries.device).expand(*queries.shape[:2], n_q)
    return rotate(layer_idx, queries.float(), positions, True).float()


def mean_rotation(rotate: Rotate, layer_idx: int, start: int, count: int, dim: int,
                  device: torch.device) -> torch.Tensor:
    """``R̄ (d, d)``: the mean over positions ``[start, start + count)`` of the RoPE matrix ``R_p`` (``R_p x`` is
    ``x`` rotated to position ``p``), found by rotating the basis vectors."""
    basis = torch.eye(dim, device=device).expand(count, dim, dim)[None]  # row i of block p: e_i
    positions = torch.arange(start, start + count, device=device)[:, None].expand(count, dim)[None]
    rotated = rotate(layer_idx, basis, positions, False)[0].float()  # block p, row i: (R_p e_i)ᵀ, i.e. R_pᵀ
    return rotated.mean(dim=0).transpose(0, 1)
