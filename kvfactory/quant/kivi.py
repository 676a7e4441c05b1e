"""KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750)."""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.quant.base import KVQuantizer


@dataclass(kw_only=True, frozen=True)
class KIVI(KVQuantizer):
    """Keys per channel, values per token, asymmetric, with a full-precision residual of the most recent tokens.

    The parameters are :class:`~kvfactory.quant.base.KVQuantizer`'s. KIVI's paper uses ``R = 128`` and groups of
    32 or 128; the default key group here is 128 (the fp16 scale and zero-point of a 32-token group cost
    0.125 bytes per value, which alone would put 4-bit KIVI above 0.30× of fp16).
    """

    name = "kivi"
