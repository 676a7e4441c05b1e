"""LayerQuant (from QPruningKV: Zhang et al. 2024, "More Tokens, Lower Precision: Towards the Optimal Token-Precision
Trade-off in KV Cache Compression", arXiv:2412.12706): a different bit-width for a range of layers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvfactory.quant.base import KVQuantizer
from kvfactory.quant.kivi import KIVI
from kvfactory.quant.packing import check_bits

FULL_PRECISION_BITS = 16


@dataclass(kw_only=True, frozen=True)
class LayerQuant(KVQuantizer):
    """KIVI with layers ``[quant_begin_layers, quant_end_layers)`` at ``quant_layers_bits`` and the others at
    ``nbits``; with ``quant_pruning`` (on by default) every layer keeps as many tokens as fit in the memory of the
    method's ``C`` 16-bit tokens at its own bit-width.

    Parameters
    ----------
    quant_layers_bits:
        Bits of the layer range: 2, 4, 8, or 16 (that range kept in full precision). Default 8.
    quant_begin_layers, quant_end_layers:
        The range (end excluded); the end defaults to a quarter of the layers.
    (others):
        As :class:`~kvfactory.quant.base.KVQuantizer`.
    """

    name = "layerquant"

    quant_layers_bits: int = 8
    quant_begin_layers: int = 0
    quant_end_layers: int | None = None
    quant_pruning: bool = True

    def __post_init__(self) -> None:
        if self.quant_layers_bits != FULL_PRECISION_BITS:
            check_bits(self.quant_layers_bits, "quant_layers_bits")
        for field_name in ("quant_begin_layers", "quant_end_layers"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{field_name} must be a non-negative integer, got {value!r}")
        super().__post_init__()

    def layer_range(self, num_layers: int) -> range:
        end = max(1, num_layers // 4) if self.quant_end_layers is None else self.quant_end_layers
        if not self.quant_begin_layers < end <= num_layers:
            raise ValueError(f"layerquant: need quant_begin_layers < quant_end_layers <= {num_layers} layers, got "
                             f"[{self.quant_begin_layers}, {end})")
        return range(self.quant_begin_layers, end)

    def layer_bits(self, layer_idx: int, num_layers: int) -> int:
        return self.quant_layers_bits if layer_idx in self.layer_range(num_layers) else self.nbits

    def for_layer(self, layer_idx: int, num_layers: int) -> KVQuantizer | None:
        bits = self.layer_bits(layer_idx, num_layers)
        if bits == FULL_PRECISION_BITS:
            return None
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(KIVI)}
        return KIVI(**{**shared, "nbits": bits})

