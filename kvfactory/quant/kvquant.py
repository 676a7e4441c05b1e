"""KVQuant (Hooper et al. 2024, "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization", arXiv:2401.18079)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvfactory.quant.base import KVQuantizer
from kvfactory.quant.outliers import check_ratio


@dataclass(kw_only=True, frozen=True)
class KVQuant(KVQuantizer):
    """Per-channel keys quantized **before RoPE** (re-applied at each dequantization from the stored positions),
    per-token values, and dense-and-sparse outliers.

    Uniform (integer) levels only: KVQuant's non-uniform ``nuq`` datatypes need offline calibration and are not
    implemented; nor is its attention-sink exemption. Outliers are the largest magnitudes of each block of each
    (sample, KV head), pre-RoPE for keys.

    Parameters
    ----------
    outlier_ratio:
        Share of the entries of each block kept exactly (fp16 values, int32 indices); default 0.01.
    (others):
        As :class:`~kvfactory.quant.base.KVQuantizer`.
    """

    name = "kvquant"
    pre_rope: ClassVar[bool] = True

    outlier_ratio: float = 0.01

    def __post_init__(self) -> None:
        check_ratio(self.outlier_ratio)
        super().__post_init__()

    def sparse_ratio(self) -> float:
        return self.outlier_ratio
