"""GEAR (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of
LLM", arXiv:2403.05527)."""
from __future__ import annotations

from dataclasses import dataclass

from kvfactory.quant.base import KVQuantizer
from kvfactory.quant.lowrank import check_rank
from kvfactory.quant.outliers import check_ratio


@dataclass(kw_only=True, frozen=True)
class GEAR(KVQuantizer):
    """Uniform quantization (KIVI's layout) plus a rank-``r`` approximation of the quantization error (truncated
    SVD per block, sample and KV head, fp16 factors) plus sparse fp16 outliers; every part is counted in bytes.

    Parameters
    ----------
    rank:
        Rank of the error approximation (default 4).
    outlier_ratio:
        Share of each block's entries kept exactly (default 0.01; 0 disables the sparse part).
    (others):
        As :class:`~kvfactory.quant.base.KVQuantizer`.
    """

    name = "gear"

    rank: int = 4
    outlier_ratio: float = 0.01

    def __post_init__(self) -> None:
        check_rank(self.rank)
        check_ratio(self.outlier_ratio)
        super().__post_init__()

    def sparse_ratio(self) -> float:
        return self.outlier_ratio

    def error_rank(self) -> int:
        return self.rank
