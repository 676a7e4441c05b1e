"""Asymmetric group quantization of ``(B, H, n, d)`` keys/values with fp16 scale and zero-point per group.

Two layouts (KIVI's):

- ``"channel"``: per-channel, a group is ``group_size`` consecutive tokens of one channel (keys);
- ``"token"``: per-token, a group is ``group_size`` consecutive channels of one token (values).

Per group, ``zero = min`` (rounded *down* to fp16) and ``scale = (max - zero) / (2**b - 1)`` (rounded *up* to fp16),
so every value lies in the representable range and the dequantization error is at most ``scale / 2``. A tensor
with a value or step beyond fp16's range (|x| > 65000) keeps its scales and zero-points in fp32 instead (fp16 would
dequantize that group to inf); :func:`quantized_nbytes` counts the usual fp16 case. Codes are
packed along the channel axis (:mod:`kvfactory.quant.packing`). Entries marked in ``exclude`` (sparse outliers,
padding slots) do not widen a group's range; their codes are clamped and must be restored by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfactory.quant.packing import check_bits, pack, packed_width, unpack_float

LAYOUTS = ("channel", "token")
SIDE_BYTES = 2 * 2  # an fp16 scale and an fp16 zero-point per group


def _grouped(x: torch.Tensor, layout: str, group_size: int) -> tuple[torch.Tensor, int]:
    """``x (B, H, n, d)`` viewed with the group axis explicit, and that axis."""
    batch, heads, n, head_dim = x.shape
    if layout == "channel":
        return x.reshape(batch, heads, n // group_size, group_size, head_dim), 3
    return x.reshape(batch, heads, n, head_dim // group_size, group_size), 4


def check_layout(layout: str, group_size: int, n: int, head_dim: int) -> None:
    """A clear error unless ``group_size`` divides the grouped axis of an ``(., ., n, head_dim)`` tensor."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    axis, size = ("tokens", n) if layout == "channel" else ("channels (head_dim)", head_dim)
    if not isinstance(group_size, int) or group_size < 1 or size % group_size:
        raise ValueError(f"a {layout} group of {group_size!r} {axis} must divide the {size} {axis}")


def _round_half(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` in fp16, rounded towards ``direction`` (+inf: never below ``x``; -inf: never above)."""
    half = x.half()
    off = half.float() < x if direction > 0 else half.float() > x
    return torch.where(off, torch.nextafter(half, torch.full_like(half, direction)), half)


#: Below fp16's largest finite value (65504) with room for rounding up to the next fp16 number.
HALF_SAFE = 65000.0


def _fits_half(low: torch.Tensor, high: torch.Tensor, levels: int) -> bool:
    """Whether every zero-point and scale is representable in fp16 (one host read per quantized tensor)."""
    if low.numel() == 0:
        return True
    worst = torch.maximum(torch.maximum(low.abs().amax(), high.abs().amax()), ((high - low) / levels).amax())
    return bool(worst <= HALF_SAFE)


@dataclass
class GroupQuantized:
    """Packed codes ``(B, H, n, ceil(d·b/8))`` uint8 plus fp16 ``scale``/``zero`` (the grouped shape, group axis 1)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    nbits: int
    layout: str
    group_size: int
    head_dim: int

    def dequantize(self) -> torch.Tensor:
        """The values ``(B, H, n, d)`` in fp32."""
        codes = unpack_float(self.packed, self.nbits, self.head_dim)
        grouped, _ = _grouped(codes, self.layout, self.group_size)
        return torch.addcmul(self.zero.float(), grouped, self.scale.float()).reshape(codes.shape)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.packed, self.scale, self.zero))

    def index_select(self, batch_index: torch.Tensor) -> "GroupQuantized":
        return GroupQuantized(self.packed.index_select(0, batch_index), self.scale.index_select(0, batch_index),
                              self.zero.index_select(0, batch_index), self.nbits, self.layout, self.group_size,
                              self.head_dim)


def quantize(x: torch.Tensor, nbits: int, layout: str, group_size: int,
             exclude: torch.Tensor | None = None) -> GroupQuantized:
    """Quantize ``x (B, H, n, d)``; ``exclude`` (broadcastable bool) marks entries that do not set the ranges."""
    check_bits(nbits)
    check_layout(layout, group_size, x.shape[2], x.shape[3])
    levels = (1 << nbits) - 1
    values = x.float()
    grouped, axis = _grouped(values, layout, group_size)
    if exclude is None:
        low, high = grouped.amin(axis, keepdim=True), grouped.amax(axis, keepdim=True)
    else:
        skip, _ = _grouped(exclude.expand(x.shape), layout, group_size)
        low = grouped.masked_fill(skip, float("inf")).amin(axis, keepdim=True)
        high = grouped.masked_fill(skip, float("-inf")).amax(axis, keepdim=True)
        empty = torch.isinf(low)  # every entry of the group excluded
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    if _fits_half(low, high, levels):
        zero = _round_half(low, float("-inf"))
        scale = _round_half((high - zero.float()) / levels, float("inf"))
    else:  # a range fp16 cannot hold (|x| or the step above 65504 would dequantize to inf): fp32 for this tensor
        zero, scale = low.clone(), (high - low) / levels
    inverse = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros_like(scale, dtype=torch.float32))
    codes = ((grouped - zero.float()) * inverse).round_().clamp_(0, levels).to(torch.uint8)
    return GroupQuantized(pack(codes.reshape(x.shape), nbits), scale.contiguous(), zero.contiguous(), nbits, layout,
                          group_size, x.shape[3])


def quantized_nbytes(batch: int, heads: int, n: int, head_dim: int, nbits: int, layout: str, group_size: int) -> int:
    """The bytes :func:`quantize` stores for a ``(batch, heads, n, head_dim)`` tensor (codes, scales, zero-points)."""
    groups = batch * heads * n * head_dim // group_size
    return batch * heads * n * packed_width(head_dim, nbits) + groups * SIDE_BYTES
