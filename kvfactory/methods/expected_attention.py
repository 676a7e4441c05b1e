"""Expected Attention: score keys by the attention future queries are expected to give them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvfactory.methods.base import WindowedCompressor
from kvfactory.methods.rope import Rotate, handle_rotate, mean_rotation, standard_rotate, unrotate_queries


@dataclass(kw_only=True)
class ExpectedAttention(WindowedCompressor):
    """Expected Attention (Devoto et al. 2025, "Expected Attention: KV Cache Compression by Estimating Attention
    from Future Queries Distribution", arXiv:2510.00636), as kvpress's ``ExpectedAttentionPress`` documents it.

    Per query head: the pre-RoPE queries of the prompt (the first ``n_sink`` left out) give a Gaussian, mean ``μ``
    and covariance ``Σ``; both are moved to the next ``n_future_positions`` positions by the average RoPE matrix
    ``R̄`` over those positions (``μ' = R̄μ``, ``Σ' = R̄ΣR̄ᵀ``). The expected logit of key ``k`` is
    ``μ'·k/√d + kᵀΣ'k/(2d)``; a softmax over the non-sink keys, averaged over the KV head's query group, times
    ``‖v‖`` (``(score + epsilon)·‖v‖`` with ``use_vnorm``) is the score. The first ``n_sink`` tokens are always kept.

    Pre-RoPE queries are recovered by inverting the model's own RoPE (the patched model's, partial rotary included);
    with a q bias (Qwen2) the mean includes it, where kvpress's ``Wq·mean(h)`` leaves it out.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per layer and KV head, sinks and window included (default 512).
    n_future_positions:
        Future positions the RoPE matrix is averaged over (default 512).
    n_sink:
        Leading tokens always kept and left out of the statistics (default 4).
    use_covariance:
        Include the ``kᵀΣ'k/(2d)`` term (default True).
    use_vnorm:
        Multiply by the value norm (default True).
    epsilon:
        Added to the attention before the value-norm rescaling (default 0.0).
    window_size:
        Recent tokens always kept (default 0, as kvpress).
    rope_theta:
        RoPE base used only on bare tensors (outside ``kvfactory.patch``), default 10000.0.
    decode_budget, compress_interval, max_capacity_prompt_ratio:
        See :class:`~kvfactory.methods.base.WindowedCompressor`; while decoding the statistics come from the last
        ``max(window_size, 1)`` queries.
    """

    name = "expected_attention"
    window_size: int = 0
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    rope_theta: float = 10000.0
    scores_with_queries = True
    scores_are_attention_mass = False  # value-norm weighted

    def __post_init__(self) -> None:
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"expected_attention: n_sink must be a non-negative integer, got {self.n_sink!r}")
        if not isinstance(self.n_future_positions, int) or self.n_future_positions < 1:
            raise ValueError(f"expected_attention: n_future_positions must be a positive integer, "
                             f"got {self.n_future_positions!r}")
        super().__post_init__()
        self._rotate: Rotate | None = None

    def attach(self, handle: Any) -> None:
        self._rotate = handle_rotate(handle)

    def num_sinks(self) -> int:
        return self.n_sink

    @property
    def query_window_size(self) -> int:
        return max(self.window_size, 1) if self.decode_budget is not None else 0

    def query_statistics(self, queries: torch.Tensor, n_keys: int, layer_idx: int
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``μ' (B, Hq, d)`` and ``Σ' (B, Hq, d, d)`` (None without covariance) of the future queries, fp32."""
        rotate = self._rotate or standard_rotate(self.rope_theta)
        pre = unrotate_queries(rotate, layer_idx, queries, n_keys)
        if pre.shape[-2] == n_keys and n_keys > self.n_sink:  # a prompt: leave the sinks' outlier queries out
            pre = pre[..., self.n_sink :, :]
        mean = pre.mean(dim=-2)
        rotation = mean_rotation(rotate, layer_idx, n_keys, self.n_future_positions, queries.shape[-1],
                                 queries.device)
        future_mean = mean @ rotation.T
        if not self.use_covariance:
            return future_mean, None
        centered = pre - mean[..., None, :]
        covariance = centered.transpose(-1, -2) @ centered / pre.shape[-2]
        return future_mean, rotation @ covariance @ rotation.T

    def score(self, queries, keys, values, *, layer_idx, accumulated=None) -> torch.Tensor:
        batch, heads, n, dim = keys.shape
        past = n - self.window_size
        mean, covariance = self.query_statistics(queries, n, layer_idx)
        groups = queries.shape[1] // heads
        scored = keys[..., self.n_sink :, :].float()  # (B, Hkv, n', d)
        mean = mean.view(batch, heads, groups, dim)
        logits = torch.einsum("bhgd,bhnd->bhgn", mean, scored) / math.sqrt(dim)
        if covariance is not None:
            covariance = covariance.view(batch, heads, groups, dim, dim)
            logits = logits + torch.einsum("bhnd,bhgde,bhne->bhgn", scored, covariance, scored) / dim / 2
        scores = logits.softmax(dim=-1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[..., self.n_sink :, :].float().norm(dim=-1)
        full = torch.cat([scores.new_zeros(batch, heads, self.n_sink), scores], dim=-1)  # sinks: kept anyway
        return full[..., :past]
