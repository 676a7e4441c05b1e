"""The optional fused C++ kernel (causal attention + column sums in one pass) against sdpa and the naive softmax,
its use by H2O on sdpa, and the fallback when it is disabled or cannot be built."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from kvfactory import kernels
from kvfactory.attention import AttentionSpec, attend


@pytest.fixture(scope="module")
def fused_kernel() -> None:
    """Skips the test when the kernel cannot be compiled or loaded here (no C++ compiler, or disabled)."""
    if not kernels.fused_column_sums_available():
        pytest.skip("fused C++ kernel unavailable: no working C++ compiler, or KVFACTORY_NO_CPP_KERNELS is set")


def random_qkv(batch: int, num_q_heads: int, num_kv_heads: int, n: int, head_dim: int = 64,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random queries / keys / values stored ``(B, n, H, d)`` and viewed ``(B, H, n, d)``, as a model's are."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=generator).transpose(1, 2)
               for heads in (num_q_heads, num_kv_heads, num_kv_heads))
    return q, k, v


def naive_column_sums(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ over queries of the causal softmax weights, ``(B, Hq, n)``, in fp64."""
    repeated = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q.double() @ repeated.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = k.shape[-2]
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1).sum(-2)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_fused_kernel_matches_sdpa_and_the_naive_column_sums(fused_kernel, num_q_heads: int, num_kv_heads: int,
                                                             n: int) -> None:
    q, k, v = random_qkv(2, num_q_heads, num_kv_heads, n)
    output, column_sums = kernels.causal_attention_column_sums(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=num_q_heads != num_kv_heads)
    assert output.shape == expected.shape and column_sums.shape == (2, num_q_heads, n)
    assert (output - expected).abs().max() <= 1e-5
    naive = naive_column_sums(q, k)
    assert ((column_sums.double() - naive) / naive).abs().max() <= 1e-5


def test_fused_kernel_blocks_and_half_precision(fused_kernel) -> None:
    """Several query blocks (the block pairing and the diagonal masking), and bf16 inputs computed in fp32."""
    q, k, v = random_qkv(1, 6, 2, 300, head_dim=32)
    output, column_sums = torch.ops.kvfactory.causal_attention_column_sums(q, k, v, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (output - expected).abs().max() <= 1e-5
    naive = naive_column_sums(q, k)
    assert ((column_sums.double() - naive) / naive).abs().max() <= 1e-5
    half_output, half_sums = kernels.causal_attention_column_sums(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half_output.dtype == torch.bfloat16 and half_sums.dtype == torch.float32
    assert torch.allclose(half_sums, column_sums, rtol=0.05) and torch.allclose(half_output.float(), output,
                                                                                atol=0.05)


def test_attend_returns_the_fused_column_sums_only_for_a_plain_causal_prefill(fused_kernel) -> None:
    q, k, v = random_qkv(2, 4, 2, 40, head_dim=16)
    output, column_sums = attend(q, k, v, AttentionSpec("sdpa"), need_lse=True, need_column_sums=True)
    assert column_sums is not None and column_sums.shape == (2, 2, 2, 40)
    assert torch.allclose(column_sums.flatten(1, 2), naive_column_sums(q, k).float(), rtol=1e-5)
    key_valid = torch.ones(2, 40, dtype=torch.bool)
    key_valid[1, :3] = False  # padding: the existing path, which gives the lse
    _, lse = attend(q, k, v, AttentionSpec("sdpa"), key_valid=key_valid, query_valid=key_valid, need_lse=True,
                    need_column_sums=True)
    assert lse is not None and lse.shape == (2, 4, 40)


def h2o_kept_positions(ids: torch.Tensor) -> list[torch.Tensor]:
    """Kept positions per layer of H2O on a tiny sdpa llama (4 query heads, 2 KV heads)."""
    import kvfactory
    from tests.conftest import tiny_model

    model = tiny_model("llama", "sdpa")
    with torch.no_grad(), kvfactory.patch(model, "h2o", max_capacity_prompt=16, window_size=4):
        out = model(ids, use_cache=True)
        return [out.past_key_values.kept_positions(layer) for layer in range(2)]


def test_h2o_keeps_the_same_tokens_with_and_without_the_kernel(fused_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fused = kernels.causal_attention_column_sums
    monkeypatch.setattr(kernels, "causal_attention_column_sums", lambda *args: calls.append(1) or fused(*args))
    ids = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(0))
    with_kernel = h2o_kept_positions(ids)
    assert len(calls) == 2  # one call per layer, no second pass
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1")
    without_kernel = h2o_kept_positions(ids)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(with_kernel, without_kernel))


def test_disabled_kernel_falls_back_to_the_lse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1")
    assert not kernels.fused_column_sums_available()
    q, k, v = random_qkv(1, 4, 2, 20, head_dim=16)
    output, lse = attend(q, k, v, AttentionSpec("sdpa"), need_lse=True, need_column_sums=True)
    assert lse is not None and lse.shape == (1, 4, 20)
    assert (output - F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)).abs().max() <= 1e-5


def test_a_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def broken_build(*args, **kwargs):
        raise RuntimeError("Error building extension\nno compiler")

    monkeypatch.setattr(cpp_extension, "load", broken_build)
    with caplog.at_level(logging.WARNING, logger="kvfactory.kernels"):
        assert kernels._load.__wrapped__() is False
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert "no compiler" in caplog.text
