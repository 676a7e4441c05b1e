"""Bit packing: 2-, 4- or 8-bit integer codes stored ``8 // nbits`` to a byte along the last dimension.

``pack(codes, nbits)`` turns ``(..., m)`` uint8 codes in ``[0, 2**nbits)`` into ``(..., ceil(m * nbits / 8))`` bytes
(the last byte zero-padded when ``m`` is not a multiple of the codes per byte); ``unpack`` is its exact inverse. The
leading dimensions stay, so a packed tensor can still be indexed by batch (beam search) or sliced by token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 4, 8)
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def check_bits(nbits: object, what: str = "nbits") -> int:
    """``nbits`` if it is one of :data:`SUPPORTED_BITS`, else a clear error."""
    if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits not in SUPPORTED_BITS:
        raise ValueError(f"{what} must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {nbits!r}")
    return nbits


def packed_width(width: int, nbits: int) -> int:
    """Bytes that ``width`` codes of ``nbits`` bits occupy."""
    per_byte = 8 // nbits
    return -(-width // per_byte)


def _shifts(nbits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, nbits, dtype=torch.uint8, device=device)


def pack(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack uint8 ``codes (..., m)`` (each ``< 2**nbits``) into ``(..., packed_width(m, nbits))`` uint8."""
    check_bits(nbits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if nbits == 8:
        return codes.contiguous().clone()
    per_byte = 8 // nbits
    width = codes.shape[-1]
    padded = packed_width(width, nbits) * per_byte
    if padded != width:
        codes = torch.nn.functional.pad(codes, (0, padded - width))
    grouped = codes.reshape(*codes.shape[:-1], padded // per_byte, per_byte)
    shifted = grouped << _shifts(nbits, codes.device)
    packed = shifted[..., 0]
    for slot in range(1, per_byte):  # disjoint bit ranges: OR them together
        packed = packed | shifted[..., slot]
    return packed.contiguous()


def unpack(packed: torch.Tensor, nbits: int, width: int) -> torch.Tensor:
    """The ``(..., width)`` uint8 codes that :func:`pack` stored in ``packed``."""
    check_bits(nbits)
    if nbits == 8:
        return packed[..., :width]
    mask = (1 << nbits) - 1
    codes = (packed[..., None] >> _shifts(nbits, packed.device)) & mask
    return codes.reshape(*packed.shape[:-1], -1)[..., :width]


def _code_table(nbits: int, device: torch.device) -> torch.Tensor:
    """``(256, 8 // nbits)`` fp32: the codes each byte value holds (a lookup replaces shifts, masks and a cast)."""
    key = (nbits, device)
    if key not in _TABLES:
        every_byte = torch.arange(256, dtype=torch.uint8, device=device)
        _TABLES[key] = ((every_byte[:, None] >> _shifts(nbits, device)) & ((1 << nbits) - 1)).float()
    return _TABLES[key]


def unpack_float(packed: torch.Tensor, nbits: int, width: int) -> torch.Tensor:
    """``unpack(packed, nbits, width)`` as fp32, in one lookup (the dequantization fast path)."""
    check_bits(nbits)
    if nbits == 8:
        return packed[..., :width].float()
    codes = F.embedding(packed.long(), _code_table(nbits, packed.device))
    return codes.reshape(*packed.shape[:-1], -1)[..., :width]
