"""GEAR's low-rank term: a rank-``r`` approximation of the quantization error of each (sample, KV head) block.

The error ``E (n × d)`` is factored as its truncated SVD, ``E ≈ L · R`` with ``R = V_rᵀ (r × d)`` the top right
singular vectors (eigenvectors of the ``d × d`` Gram matrix ``EᵀE``, cheaper than an SVD of the tall ``E``) and
``L = E V_r = U_r Σ_r (n × r)``, both stored in fp16; decoding adds ``L · R`` back to the dequantized block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FACTOR_BYTES = 2  # fp16


def effective_rank(rank: int, n: int, head_dim: int) -> int:
    return min(rank, n, head_dim)


def check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank


@dataclass
class LowRank:
    """``left (B, H, n, r)`` and ``right (B, H, r, d)`` fp16 factors."""

    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def fit(cls, error: torch.Tensor, rank: int) -> "LowRank":
        """The best rank-``rank`` approximation of ``error (B, H, n, d)`` (per sample and head)."""
        r = effective_rank(rank, error.shape[2], error.shape[3])
        error = error.float()
        # the top right-singular vectors are the top eigenvectors of the d × d Gram matrix (cheap: d is the head size)
        _, vectors = torch.linalg.eigh(error.transpose(-1, -2) @ error)
        right = vectors[..., -r:].flip(-1).transpose(-1, -2)  # (B, H, r, d), largest first
        return cls((error @ right.transpose(-1, -2)).half().contiguous(), right.half().contiguous())

    def expand(self) -> torch.Tensor:
        """``L · R`` as ``(B, H, n, d)`` fp32."""
        return torch.matmul(self.left.float(), self.right.float())

    def add_to(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense (B, H, n, d)`` fp32 contiguous ``+= L · R``, in place (no product tensor is allocated)."""
        batch, heads, n, head_dim = dense.shape
        flat = dense.view(batch * heads, n, head_dim)
        flat.baddbmm_(self.left.float().view(batch * heads, n, -1), self.right.float().view(batch * heads, -1, head_dim))
        return dense

    def nbytes(self) -> int:
        return self.left.untyped_storage().nbytes() + self.right.untyped_storage().nbytes()

    def index_select(self, batch_index: torch.Tensor) -> "LowRank":
        return LowRank(self.left.index_select(0, batch_index), self.right.index_select(0, batch_index))


def low_rank_nbytes(batch: int, heads: int, n: int, head_dim: int, rank: int) -> int:
    return batch * heads * effective_rank(rank, n, head_dim) * (n + head_dim) * FACTOR_BYTES
