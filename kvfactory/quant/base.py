"""The quantizer contract shared by KIVI, KVQuant, GEAR and LayerQuant.

A quantizer turns a block of kept keys/values ``(B, Hkv, n, d)`` into packed storage and back:

    encode:  [keys un-rotated (KVQuant)] -> [sparse outliers aside] -> group quantization -> [low-rank error (GEAR)]
    decode:  dequantize -> [+ low-rank] -> [outliers written back] -> [RoPE re-applied (KVQuant)]

Keys are quantized per channel (groups of ``q_group_size`` tokens), values per token (groups of
``value_group_size`` channels), asymmetric, with fp16 scales and zero-points. The most recent tokens stay in full
precision in a residual (:class:`~kvfactory.storage.quantized.QuantizedStore`): once it holds
``quant_residual_length`` tokens or more, its oldest whole key groups are quantized (:meth:`quantized_prefix`).

Every byte has its arithmetic here (:meth:`block_nbytes`, :meth:`stored_nbytes`), which the tests check against the
real tensors and which quantized pruning uses to fit a memory budget exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from kvfactory.quant.groups import GroupQuantized, quantize, quantized_nbytes
from kvfactory.quant.lowrank import LowRank, low_rank_nbytes
from kvfactory.quant.outliers import SparseOutliers, outliers_nbytes
from kvfactory.quant.packing import check_bits

POSITION_BYTES = 4  # int32 position per slot and KV head, held by every store
# rotate(states (B, H, n, d), positions (B, H, n), inverse) -> states: one layer's RoPE
LayerRotary = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class EncodedTensor:
    """One quantized block of keys or values: the dense codes and the optional sparse / low-rank parts."""

    quantized: GroupQuantized
    outliers: SparseOutliers | None = None
    low_rank: LowRank | None = None

    def decode(self) -> torch.Tensor:
        """``(B, H, n, d)`` fp32."""
        dense = self.quantized.dequantize()
        if self.low_rank is not None:
            self.low_rank.add_to(dense)
        return dense if self.outliers is None else self.outliers.restore(dense)

    def parts(self) -> list[object]:
        return [part for part in (self.quantized, self.outliers, self.low_rank) if part is not None]

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts())  # type: ignore[attr-defined]

    def index_select(self, batch_index: torch.Tensor) -> "EncodedTensor":
        pick = (lambda part: None if part is None else part.index_select(batch_index))
        return EncodedTensor(pick(self.quantized), pick(self.outliers), pick(self.low_rank))


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


@dataclass(kw_only=True, frozen=True)
class KVQuantizer:
    """Base of every quantizer. Subclasses are dataclasses whose fields are their parameters.

    Parameters
    ----------
    nbits:
        Bits per quantized value: 2, 4 or 8 (default 4).
    q_group_size:
        Tokens per key group (keys are quantized per channel over this many tokens). Default 128.
    value_group_size:
        Channels per value group (values are quantized per token); default: the whole head dimension.
    quant_residual_length:
        ``R``, KIVI's full-precision residual: the most recent tokens stay in the model's dtype until ``R`` of them
        have gathered, then their whole key groups are quantized. Default 128; 0 quantizes every whole group at once.
    quant_pruning:
        QPruningKV: read the eviction method's budget ``C`` as the memory of ``C`` 16-bit tokens and keep as many
        tokens as fit in it at ``nbits`` (about ``C·16/nbits``, scales, zero-points, residual and positions counted).
    """

    name: ClassVar[str] = ""
    key_layout: ClassVar[str] = "channel"
    value_layout: ClassVar[str] = "token"
    pre_rope: ClassVar[bool] = False  # quantize keys before RoPE (re-applied when dequantizing)

    nbits: int = 4
    q_group_size: int = 128
    value_group_size: int | None = None
    quant_residual_length: int = 128
    quant_pruning: bool = False

    def __post_init__(self) -> None:
        check_bits(self.nbits)
        check_positive_int(self.q_group_size, "q_group_size")
        if self.value_group_size is not None:
            check_positive_int(self.value_group_size, "value_group_size")
        check_positive_int(self.quant_residual_length, "quant_residual_length", minimum=0)
        if not isinstance(self.quant_pruning, bool):
            raise ValueError(f"quant_pruning must be True or False, got {self.quant_pruning!r}")

    # -- what a subclass adds ------------------------------------------------------------------------------------
    def sparse_ratio(self) -> float:
        """Share of each block kept aside as exact fp16 outliers (KVQuant, GEAR)."""
        return 0.0

    def error_rank(self) -> int:
        """Rank of the low-rank quantization-error term (GEAR); 0: none."""
        return 0

    def for_layer(self, layer_idx: int, num_layers: int) -> "KVQuantizer | None":
        """The quantizer of one layer (None: that layer stays in full precision). LayerQuant varies the bits."""
        return self

    # -- shapes and the residual rule ----------------------------------------------------------------------------
    def value_group(self, head_dim: int) -> int:
        return self.value_group_size or head_dim

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.value_group(head_dim):
            raise ValueError(f"{self.name}: value_group_size={self.value_group_size} must divide head_dim={head_dim}")

    def quantized_prefix(self, length: int) -> int:
        """How many of ``length`` full-precision tokens to quantize now: every whole key group once the residual
        holds at least ``quant_residual_length`` tokens, else none."""
        if length < self.quant_residual_length:
            return 0
        return length // self.q_group_size * self.q_group_size

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, rotate: LayerRotary | None,
               exclude: torch.Tensor | None = None) -> tuple[EncodedTensor, EncodedTensor]:
        """Quantize a block: ``keys/values (B, H, n, d)`` post-RoPE, ``positions (B, H, n)``, ``exclude
        (B, 1, n, 1)`` padding slots (they set no ranges)."""
        if self.pre_rope:
            if rotate is None:
                raise ValueError(f"{self.name} quantizes keys before RoPE and needs the model's rotary embedding")
            keys = rotate(keys.float(), positions, True)
        head_dim = keys.shape[-1]
        return (self._encode(keys, self.key_layout, self.q_group_size, exclude),
                self._encode(values, self.value_layout, self.value_group(head_dim), exclude))

    def _encode(self, x: torch.Tensor, layout: str, group_size: int, exclude: torch.Tensor | None) -> EncodedTensor:
        x = x.float()
        if exclude is not None:
            x = x.masked_fill(exclude, 0.0)
        outliers = SparseOutliers.extract(x, self.sparse_ratio())
        skip = exclude
        if outliers is not None:
            skip = outliers.mask(x.shape) if skip is None else skip | outliers.mask(x.shape)
        quantized = quantize(x, self.nbits, layout, group_size, skip)
        low_rank = None
        if self.error_rank():
            error = x - quantized.dequantize()
            if skip is not None:
                error = error.masked_fill(skip, 0.0)  # outliers are exact, padding is never read
            low_rank = LowRank.fit(error, self.error_rank())
        return EncodedTensor(quantized, outliers, low_rank)

    def decode_keys(self, keys: EncodedTensor, positions: torch.Tensor, rotate: LayerRotary | None,
                    dtype: torch.dtype) -> torch.Tensor:
        """A block's keys, post-RoPE, in ``dtype`` (values need no more than ``EncodedTensor.decode``)."""
        decoded = keys.decode()
        if self.pre_rope:
            assert rotate is not None
            decoded = rotate(decoded, positions, False)
        return decoded.to(dtype)

    # -- bytes ---------------------------------------------------------------------------------------------------
    def tensor_nbytes(self, batch: int, heads: int, n: int, head_dim: int, layout: str, group_size: int) -> int:
        """Bytes of one encoded ``(batch, heads, n, head_dim)`` block of keys or values."""
        total = quantized_nbytes(batch, heads, n, head_dim, self.nbits, layout, group_size)
        total += outliers_nbytes(batch, heads, n, head_dim, self.sparse_ratio())
        if self.error_rank():
            total += low_rank_nbytes(batch, heads, n, head_dim, self.error_rank())
        return total

    def block_nbytes(self, batch: int, heads: int, n: int, head_dim: int) -> int:
        """Bytes of an encoded block of keys and values (codes, scales, zero-points, outliers, low-rank factors)."""
        return (self.tensor_nbytes(batch, heads, n, head_dim, self.key_layout, self.q_group_size)
                + self.tensor_nbytes(batch, heads, n, head_dim, self.value_layout, self.value_group(head_dim)))

    def stored_nbytes(self, tokens: int, heads: int, head_dim: int, dtype_bytes: int) -> int:
        """Bytes one sample's layer holds right after keeping ``tokens`` tokens: the quantized prefix, the
        full-precision residual (``dtype_bytes`` per value) and an int32 position per slot and head."""
        quantized = self.quantized_prefix(tokens)
        block = self.block_nbytes(1, heads, quantized, head_dim) if quantized else 0
        residual = (tokens - quantized) * heads * 2 * head_dim * dtype_bytes
        return block + residual + tokens * heads * POSITION_BYTES

    def describe(self) -> dict[str, object]:
        return {"quant_method": self.name, **dataclasses.asdict(self)}
