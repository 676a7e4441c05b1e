"""The fused decode kernels (kvfactory/kernels/decode_attention.cpp): attention over KIVI's packed codes against
dequantize-then-sdpa, ragged decode attention against masked dense attention, their use by the stores, and the
pure-PyTorch fallback when the kernels are disabled."""
from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvfactory
from kvfactory import kernels
from kvfactory.attention import AttentionSpec, attend
from kvfactory.storage import fused_decode as decode
from kvfactory.quant.groups import quantize
from kvfactory.storage.dense import DenseStore, StoreRow
from kvfactory.storage.quantized import QuantizedStore
from kvfactory.storage.ragged import RaggedStore
from tests.conftest import greedy, random_prompt, tiny_model

SDPA = AttentionSpec("sdpa")


@pytest.fixture(scope="module")
def decode_kernels() -> None:
    if not kernels.decode_kernels_available():
        pytest.skip("C++ decode kernels unavailable: no working C++ compiler, or KVFACTORY_NO_CPP_KERNELS is set")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def cache_states(batch: int, heads: int, n: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with per-channel offsets (what makes KIVI quantize keys per channel) and plain random values."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, head_dim, generator=generator) + 3 * torch.randn(
        batch, heads, 1, head_dim, generator=generator)
    return keys, torch.randn(batch, heads, n, head_dim, generator=generator)


def reference(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, residual: int,
              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """sdpa in fp32 over dequantized keys/values: causal among the new tokens when they are in a residual."""
    nq, total = queries.shape[2], keys.shape[2]
    mask = torch.ones(nq, total, dtype=torch.bool)
    if residual:
        mask = mask.tril(total - nq)
    mask = mask[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)


# every (bits, key group, residual, GQA) combination once, the context lengths cycled over them (1 token .. 8k)
LENGTHS = [1, 8192, 200, 4096, 1000, 33, 2048, 7000, 129]
CASES = [(bits, group, residual, gqa, LENGTHS[i % len(LENGTHS)]) for i, (bits, group, residual, gqa) in enumerate(
    itertools.product((2, 4, 8), (32, 64, 128), (True, False), ((9, 3), (8, 2))))]


@pytest.mark.parametrize("bits,group,with_residual,gqa,n", CASES)
def test_fused_quantized_attention_equals_dequantize_then_sdpa(decode_kernels, bits: int, group: int,
                                                               with_residual: bool, gqa: tuple[int, int],
                                                               n: int) -> None:
    num_q_heads, num_kv_heads = gqa
    head_dim = 64 if num_kv_heads == 3 else 128
    nq = min(n, 1 + n % 3)  # 1 to 3 new tokens
    keys, values = cache_states(2, num_kv_heads, n, head_dim, seed=n + bits)
    quantized = max(0, n - nq) // group * group if with_residual else -(-n // group) * group
    if not with_residual and quantized > n:  # no residual: pad the keys to whole groups (padding marked invalid)
        pad = quantized - n
        keys, values = F.pad(keys, (0, 0, 0, pad)), F.pad(values, (0, 0, 0, pad))
    residual = keys.shape[2] - quantized
    valid = torch.ones(2, quantized, dtype=torch.bool)
    valid[:, n:] = False
    valid[1, : min(5, n - 1)] = False  # a left-padded second sample (keeping one real token)
    exclude = ~valid[:, None, :, None]
    packed_keys = quantize(keys[:, :, :quantized], bits, "channel", group, exclude)
    packed_values = quantize(values[:, :, :quantized], bits, "token", 32 if head_dim == 128 else head_dim, exclude)
    queries = torch.randn(2, num_q_heads, nq, head_dim, generator=torch.Generator().manual_seed(1))
    block = (packed_keys.packed, packed_keys.scale, packed_keys.zero, packed_values.packed, packed_values.scale,
             packed_values.zero, valid)
    output = kernels.quantized_decode_attention(
        queries, [block] if quantized else [], keys[:, :, quantized:].contiguous(),
        values[:, :, quantized:].contiguous(), None, bits, group, packed_values.group_size)
    dense_keys, dense_values = keys, values
    if quantized:
        dense_keys = torch.cat([packed_keys.dequantize(), keys[:, :, quantized:]], dim=2)
        dense_values = torch.cat([packed_values.dequantize(), values[:, :, quantized:]], dim=2)
    key_valid = torch.cat([valid, torch.ones(2, residual, dtype=torch.bool)], dim=1)
    expected = reference(queries, dense_keys, dense_values, residual, key_valid)
    assert output.shape == expected.shape
    assert relative_error(output, expected) <= 1e-5


def quantized_store(bits: int, n: int, heads: int = 3, head_dim: int = 64, **params: int) -> QuantizedStore:
    keys, values = cache_states(1, heads, n, head_dim, seed=bits)
    positions = torch.arange(n, dtype=torch.int32).expand(1, heads, n)
    quantizer = kvfactory.quant.get("kivi", nbits=bits, **params)
    return QuantizedStore.from_rows([StoreRow(keys, values, positions)], quantizer)


def test_quantized_store_decodes_through_the_kernel(decode_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks (appended while decoding) and the residual, one new token then three."""
    store = quantized_store(4, 1000, q_group_size=32, quant_residual_length=64)
    generator = torch.Generator().manual_seed(3)
    for nq in (1, 60, 1, 3):  # after the 60-token chunk the next append moves residual groups into a new block
        store.append(*cache_states(1, 3, nq, 64, seed=nq + store.length), torch.arange(nq)[None] + store.length)
    assert len(store.blocks) >= 2 and store.residual.length >= 3
    queries = torch.randn(1, 9, 3, 64, generator=generator)
    calls = []
    fused = kernels.quantized_decode_attention
    monkeypatch.setattr(kernels, "quantized_decode_attention", lambda *a: calls.append(1) or fused(*a))
    output, _ = store.attend(queries, SDPA)
    expected, _ = attend(queries, store.keys, store.values, SDPA)
    assert calls == [1] and relative_error(output, expected) <= 1e-5


@pytest.mark.parametrize("method,params", [
    ("kvquant", {}), ("gear", {}), ("kivi", {"attention": AttentionSpec("sdpa", sliding_window=50)}),
])
def test_cases_the_kernel_does_not_cover_fall_back(decode_kernels, monkeypatch: pytest.MonkeyPatch, method: str,
                                                   params: dict) -> None:
    """KVQuant (pre-RoPE keys, outliers), GEAR (low-rank + outliers) and a sliding window dequantize instead."""
    spec = params.pop("attention", SDPA)
    keys, values = cache_states(1, 2, 300, 32, seed=0)
    positions = torch.arange(300, dtype=torch.int32).expand(1, 2, 300)
    rotate = (lambda states, _positions, _inverse: states) if method == "kvquant" else None
    store = QuantizedStore.from_rows([StoreRow(keys, values, positions)],
                                     kvfactory.quant.get(method, q_group_size=32, quant_residual_length=32), rotate)
    monkeypatch.setattr(kernels, "quantized_decode_attention", lambda *a: pytest.fail("the kernel ran"))
    queries = torch.randn(1, 4, 1, 32)
    output, _ = store.attend(queries, spec, query_positions=torch.tensor([[299]]))
    expected, _ = attend(queries, store.keys, store.values, spec, query_positions=torch.tensor([[299]]),
                         key_positions=store.positions)
    assert torch.equal(output, expected)


def test_disabled_kernels_fall_back_to_pure_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVFACTORY_NO_CPP_KERNELS=1: neither kernel runs, the stores' own paths give the same attention."""
    quantized = quantized_store(2, 700, q_group_size=64)
    ragged = ragged_store(seed=4)
    queries = torch.randn(2, 9, 1, 64)
    enabled_q = quantized.attend(queries[:1], SDPA)[0]
    enabled_r = ragged.attend(queries, SDPA)[0]
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1")
    assert not kernels.decode_kernels_available()
    for name in ("quantized_decode_attention", "ragged_decode_attention"):
        monkeypatch.setattr(kernels, name, lambda *a: pytest.fail("a disabled kernel ran"))
    disabled_q = quantized.attend(queries[:1], SDPA)[0]
    disabled_r = ragged.attend(queries, SDPA)[0]
    assert relative_error(disabled_q, enabled_q) <= 1e-5 and relative_error(disabled_r, enabled_r) <= 1e-5
    expected, _ = attend(queries[:1], quantized.keys, quantized.values, SDPA)
    assert torch.equal(disabled_q, expected)


def ragged_store(seed: int, batch: int = 2, heads: int = 3, n: int = 600, head_dim: int = 64) -> RaggedStore:
    """A batch whose (sample, KV head) rows keep different numbers of tokens (one keeps none of the prompt)."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = cache_states(batch, heads, n, head_dim, seed)
    keep = torch.rand(batch, heads, n, generator=generator) < torch.rand(batch, heads, 1, generator=generator)
    keep[0, 1] = False
    positions = torch.arange(n, dtype=torch.int32).expand(batch, heads, n)
    return RaggedStore.from_mask(keys, values, positions, keep)


@pytest.mark.parametrize("batch,nq,tail_steps", [(1, 1, 1), (2, 1, 5), (2, 3, 2), (3, 2, 40)])
def test_ragged_kernel_equals_masked_dense_attention(decode_kernels, monkeypatch: pytest.MonkeyPatch, batch: int,
                                                     nq: int, tail_steps: int) -> None:
    store = ragged_store(seed=batch + nq, batch=batch)
    generator = torch.Generator().manual_seed(7)
    for step in range(tail_steps):
        valid = torch.ones(batch, nq, dtype=torch.bool)
        if batch > 1 and step == 0:
            valid[1] = False  # padding in the tail
        store.append(*cache_states(batch, 3, nq, 64, seed=step), torch.full((batch, nq), 600 + step), valid)
    queries = torch.randn(batch, 9, nq, 64, generator=generator)
    calls = []
    fused = kernels.ragged_decode_attention
    monkeypatch.setattr(kernels, "ragged_decode_attention", lambda *a: calls.append(1) or fused(*a))
    output, _ = store.attend(queries, SDPA)
    keys, values, _, valid = store.padded()  # (B, Hkv, T, d), valid (B, Hkv, T)
    total = keys.shape[2]
    mask = valid[:, :, None, :] & torch.ones(nq, total, dtype=torch.bool).tril(total - nq)
    expected = F.scaled_dot_product_attention(queries, keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1),
                                              attn_mask=mask.repeat_interleave(3, 1))
    assert calls == [1] and relative_error(output, expected) <= 1e-5


def test_models_generate_the_same_tokens_with_and_without_the_kernels(decode_kernels,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """kivi-4 and adakv (ragged) greedy decoding on a tiny llama, with and without the kernels."""
    model = tiny_model("llama")
    prompt = random_prompt(120, seed=2)
    configs = [("fullkv", {"quant_method": "kivi", "nbits": 4, "q_group_size": 16, "quant_residual_length": 16}),
               ("adakv", {"max_capacity_prompt": 40})]
    fused = [greedy_with(model, prompt, *config) for config in configs]
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "1")
    assert [greedy_with(model, prompt, *config) for config in configs] == fused


def greedy_with(model: torch.nn.Module, prompt: torch.Tensor, method: str, params: dict) -> list[int]:
    with kvfactory.patch(model, method, **params):
        return greedy(model, prompt, 12).flatten().tolist()


def test_fusable_quantizers() -> None:
    assert decode.quantized_fusable(quantized_store(2, 300))
    assert not decode.quantized_fusable(quantized_store(2, 300, value_group_size=2))  # 4 codes per byte


TRITON_QUANTIZED_CASES = [(2, True, (4, 2)), (4, False, (9, 3)), (8, True, (4, 2))]


def triton_quantized_error(bits: int, with_residual: bool, gqa: tuple[int, int]) -> float:
    """The Triton quantized kernel's relative error against dequantize-then-sdpa (run under the interpreter)."""
    from kvfactory.kernels import triton_decode

    num_q_heads, num_kv_heads = gqa
    head_dim, group, n, nq = 32, 32, 96, 2 if with_residual else 1
    keys, values = cache_states(2, num_kv_heads, n, head_dim, seed=bits)
    quantized = 64 if with_residual else n
    valid = torch.ones(2, quantized, dtype=torch.bool)
    valid[1, :5] = False
    packed_keys = quantize(keys[:, :, :quantized], bits, "channel", group, ~valid[:, None, :, None])
    packed_values = quantize(values[:, :, :quantized], bits, "token", 16, ~valid[:, None, :, None])
    queries = torch.randn(2, num_q_heads, nq, head_dim, generator=torch.Generator().manual_seed(1))
    block = (packed_keys.packed, packed_keys.scale, packed_keys.zero, packed_values.packed, packed_values.scale,
             packed_values.zero, valid)
    residual = n - quantized
    output = triton_decode.quantized_decode_attention(
        queries, [block], keys[:, :, quantized:].contiguous(), values[:, :, quantized:].contiguous(), None, bits,
        group, 16)
    dense_keys = torch.cat([packed_keys.dequantize(), keys[:, :, quantized:]], dim=2)
    dense_values = torch.cat([packed_values.dequantize(), values[:, :, quantized:]], dim=2)
    key_valid = torch.cat([valid, torch.ones(2, residual, dtype=torch.bool)], dim=1)
    return relative_error(output, reference(queries, dense_keys, dense_values, residual, key_valid))


def triton_ragged_error() -> float:
    """The Triton ragged kernel's relative error against masked dense attention (run under the interpreter)."""
    from kvfactory.kernels import triton_decode

    store = ragged_store(seed=1, n=120, head_dim=32)
    for step in range(3):
        valid = torch.tensor([[True, True], [step != 0, step != 0]])
        store.append(*cache_states(2, 3, 2, 32, seed=step), torch.full((2, 2), 120 + step), valid)
    queries = torch.randn(2, 9, 2, 32)
    output = triton_decode.ragged_decode_attention(
        queries, store._keys, store._values, store.lengths, store.prefix_size, store.layout.tail_capacity,
        store.tail_length, store.tail_valid)
    keys, values, _, valid = store.padded()
    total = keys.shape[2]
    mask = valid[:, :, None, :] & torch.ones(2, total, dtype=torch.bool).tril(total - 2)
    expected = F.scaled_dot_product_attention(queries, keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1),
                                              attn_mask=mask.repeat_interleave(3, 1))
    return relative_error(output, expected)


def test_triton_kernels_in_the_interpreter() -> None:
    """The GPU path's Triton kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton
    is first imported, hence a fresh process); skipped when triton is not installed."""
    pytest.importorskip("triton")
    script = ("from tests.test_decode_kernels import TRITON_QUANTIZED_CASES, triton_quantized_error, "
              "triton_ragged_error\n"
              "print([triton_quantized_error(*case) for case in TRITON_QUANTIZED_CASES] + [triton_ragged_error()])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    errors = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert len(errors) == len(TRITON_QUANTIZED_CASES) + 1 and max(errors) <= 1e-5, errors
