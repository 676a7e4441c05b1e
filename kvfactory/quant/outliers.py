"""Dense-and-sparse decomposition (KVQuant, GEAR): the largest-magnitude entries kept exactly, in fp16, aside.

Per ``(sample, KV head)`` of a ``(B, H, n, d)`` tensor, the ``ceil(ratio · n · d)`` entries of largest magnitude are
stored as flat int32 indices into the ``n × d`` block plus fp16 values; the dense quantizer ignores them when it sets
its ranges, and :meth:`SparseOutliers.restore` writes them back over the dequantized block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ENTRY_BYTES = 4 + 2  # an int32 index and an fp16 value


def outlier_count(n: int, head_dim: int, ratio: float) -> int:
    """Outliers kept per (sample, KV head) of an ``n``-token block (0 when ``ratio`` is 0)."""
    return min(n * head_dim, math.ceil(ratio * n * head_dim)) if ratio > 0 else 0


def check_ratio(ratio: object, name: str = "outlier_ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


@dataclass
class SparseOutliers:
    """``indices (B, H, k)`` int32 into the flattened ``n × d`` block and their exact ``values (B, H, k)`` fp16."""

    indices: torch.Tensor
    values: torch.Tensor

    @classmethod
    def extract(cls, x: torch.Tensor, ratio: float) -> "SparseOutliers | None":
        """The top-``ratio`` magnitudes of each (sample, head) of ``x (B, H, n, d)``; None when there are none."""
        batch, heads, n, head_dim = x.shape
        count = outlier_count(n, head_dim, ratio)
        if count == 0:
            return None
        flat = x.reshape(batch, heads, n * head_dim)
        indices = flat.abs().topk(count, dim=-1, sorted=False).indices
        return cls(indices.to(torch.int32), flat.gather(-1, indices).half())

    def mask(self, shape: torch.Size) -> torch.Tensor:
        """Bool ``shape`` (``(B, H, n, d)``), True at the outliers."""
        batch, heads = shape[0], shape[1]
        flat = torch.zeros(batch, heads, shape[2] * shape[3], dtype=torch.bool, device=self.indices.device)
        return flat.scatter_(-1, self.indices.long(), True).view(shape)

    def restore(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense (B, H, n, d)`` with the outliers written back (in place)."""
        batch, heads, n, head_dim = dense.shape
        flat = dense.view(batch, heads, n * head_dim)
        flat.scatter_(-1, self.indices.long(), self.values.to(dense.dtype))
        return dense

    def nbytes(self) -> int:
        return self.indices.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def index_select(self, batch_index: torch.Tensor) -> "SparseOutliers":
        return SparseOutliers(self.indices.index_select(0, batch_index), self.values.index_select(0, batch_index))


def outliers_nbytes(batch: int, heads: int, n: int, head_dim: int, ratio: float) -> int:
    return batch * heads * outlier_count(n, head_dim, ratio) * ENTRY_BYTES
