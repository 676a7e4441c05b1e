"""Quantization primitives and the quantized store, without a model: packing, error bounds, bytes, the residual."""
from __future__ import annotations

import pytest
import torch

from kvfactory import quant
from kvfactory.attention import AttentionSpec, attend
from kvfactory.quant.budget import dense_nbytes, tokens_for_memory
from kvfactory.quant.groups import quantize
from kvfactory.quant.packing import SUPPORTED_BITS, pack, unpack, unpack_float
from kvfactory.storage.dense import DenseStore, StoreRow
from kvfactory.storage.quantized import QuantizedStore

SMALL = dict(q_group_size=16, quant_residual_length=32)  # small groups so short tensors exercise every path


def kv(batch: int = 1, heads: int = 2, n: int = 96, head_dim: int = 16, seed: int = 0) -> StoreRow:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, head_dim, generator=generator) * torch.linspace(0.2, 4, head_dim)
    values = torch.randn(batch, heads, n, head_dim, generator=generator)
    positions = torch.arange(n, dtype=torch.int32).expand(batch, heads, n).clone()
    return StoreRow(keys, values, positions)


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("width", [16, 17, 64])
def test_pack_unpack_round_trip_is_bit_exact(nbits: int, width: int) -> None:
    codes = torch.randint(0, 2**nbits, (2, 3, 5, width), dtype=torch.uint8)
    packed = pack(codes, nbits)
    assert packed.shape[-1] == -(-width * nbits // 8)
    assert torch.equal(unpack(packed, nbits, width), codes)
    assert torch.equal(unpack_float(packed, nbits, width), codes.float())


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("layout,group", [("channel", 32), ("token", 8), ("token", 16)])
def test_dequantization_error_within_half_a_step(nbits: int, layout: str, group: int) -> None:
    x = kv(n=64).keys * 3 + 1.5
    quantized = quantize(x, nbits, layout, group)
    error = (quantized.dequantize() - x).abs()
    grouped = x.reshape(1, 2, 2, 32, 16) if layout == "channel" else x.reshape(1, 2, 64, 16 // group, group)
    axis = 3 if layout == "channel" else 4
    spread = grouped.amax(axis, keepdim=True) - grouped.amin(axis, keepdim=True)
    bound = (spread / (2**nbits - 1) / 2 * (1 + 2**-9) + 1e-6).expand_as(grouped).reshape(x.shape)
    assert bool((error <= bound).all()), (error - bound).max()


def test_quantized_attention_error_small_and_shrinking_with_bits() -> None:
    row = kv(n=256)
    queries = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(7))
    spec = AttentionSpec("sdpa")
    exact, _ = attend(queries, row.keys, row.values, spec)
    errors = []
    for nbits in SUPPORTED_BITS:
        store = QuantizedStore.from_rows([row], quant.get("kivi", nbits=nbits, **SMALL))
        output, _ = attend(queries, store.keys, store.values, spec)
        errors.append(float((output - exact).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 * float(exact.abs().max())


@pytest.mark.parametrize("name", ["kivi", "kvquant", "gear"])
@pytest.mark.parametrize("n", [8, 40, 96])
def test_store_bytes_equal_the_arithmetic(name: str, n: int) -> None:
    quantizer = quant.get(name, nbits=2, **SMALL)
    store = QuantizedStore.from_rows([kv(n=n)], quantizer, rotate=lambda states, positions, inverse: states)
    assert store.nbytes() == quantizer.stored_nbytes(n, heads=2, head_dim=16, dtype_bytes=4)
    expected_quantized = 0 if n < 32 else n // 16 * 16
    assert store.quantized_length == expected_quantized and store.length == n


def test_bytes_shrink_against_full_precision() -> None:
    row = kv(n=1024, head_dim=64)
    full = DenseStore.from_rows([row]).nbytes()
    ratios = [QuantizedStore.from_rows([row], quant.get("kivi", nbits=b)).nbytes() / full for b in SUPPORTED_BITS]
    assert ratios[0] < ratios[1] < ratios[2] < 0.3  # fp32 reference: 8-bit is about a quarter


def test_decode_appends_flow_through_the_residual() -> None:
    row = kv(n=40)
    store = QuantizedStore.from_rows([row], quant.get("kivi", nbits=4, **SMALL))
    assert (store.quantized_length, store.residual.length) == (32, 8)
    new = kv(n=40, seed=1)
    lengths = []
    for t in range(40):
        store.append(new.keys[:, :, t : t + 1], new.values[:, :, t : t + 1], torch.full((1, 1), 40 + t))
        lengths.append((store.quantized_length, store.residual.length))
        assert torch.equal(store.keys[:, :, -1:], new.keys[:, :, t : t + 1])  # the newest token: full precision
    # the residual gathers 32 tokens, then its whole 16-token groups move into a block before the next append
    assert lengths[23] == (32, 32) and lengths[24] == (64, 1) and max(r for _, r in lengths) == 32
    assert store.positions[0, 0].tolist() == list(range(80))
    assert len(store.blocks) == 2


def test_kvquant_quantizes_keys_before_rope_and_restores_them() -> None:
    row = kv(n=64)

    def rotate(states: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:  # a toy 2-D rotation
        theta = positions[..., None].float() * 0.1 * (-1 if inverse else 1)
        half = states.shape[-1] // 2
        first, second = states[..., :half], states[..., half:]
        return torch.cat([first * theta.cos() - second * theta.sin(), first * theta.sin() + second * theta.cos()], -1)

    pre_rope = row.keys
    rotated = rotate(pre_rope, row.positions, False)
    quantizer = quant.get("kvquant", nbits=8, outlier_ratio=0.0, **SMALL)
    store = QuantizedStore.from_rows([StoreRow(rotated, row.values, row.positions)], quantizer, rotate)
    codes = store.blocks[0].keys.decode()  # what was quantized: the pre-RoPE keys
    assert float((codes - pre_rope).abs().max()) < 0.05
    assert float((store.keys - rotated).abs().max()) < 0.05


@pytest.mark.parametrize("name", ["kvquant", "gear"])
def test_sparse_outliers_are_kept_exactly(name: str) -> None:
    row = kv(n=64)
    keys = row.keys.clone()
    keys[0, 1, 5, 3] = 300.0
    keys[0, 0, 40, 7] = -250.0
    quantizer = quant.get(name, nbits=2, outlier_ratio=0.01, **SMALL)
    store = QuantizedStore.from_rows([StoreRow(keys, row.values, row.positions)], quantizer,
                                     rotate=lambda states, positions, inverse: states)
    decoded = store.keys
    assert float(decoded[0, 1, 5, 3]) == 300.0 and float(decoded[0, 0, 40, 7]) == -250.0
    plain = QuantizedStore.from_rows([StoreRow(keys, row.values, row.positions)], quant.get("kivi", nbits=2, **SMALL))
    assert float((decoded - keys).abs().mean()) < float((plain.keys - keys).abs().mean())


def test_gear_low_rank_term_reduces_the_error() -> None:
    row = kv(n=64)
    low_rank = quant.get("gear", nbits=2, rank=4, outlier_ratio=0.0, **SMALL)
    plain = quant.get("kivi", nbits=2, **SMALL)
    errors = [float((QuantizedStore.from_rows([row], q).values - row.values).norm()) for q in (low_rank, plain)]
    assert errors[0] < errors[1]


def test_snapshot_restore_is_exact_and_reorder_follows_the_batch() -> None:
    rows = [kv(n=40, seed=0), kv(n=40, seed=1)]
    store = QuantizedStore.from_rows(rows, quant.get("kivi", nbits=4, **SMALL))
    before = (store.keys.clone(), store.values.clone(), store.length)
    snapshot = store.snapshot()
    new = kv(batch=2, n=50, seed=2)
    for t in range(50):
        store.append(new.keys[:, :, t : t + 1], new.values[:, :, t : t + 1], torch.full((2, 1), 40 + t))
    assert store.length == 90 and len(store.blocks) > 1
    store.restore(snapshot)
    assert store.length == before[2] and torch.equal(store.keys, before[0]) and torch.equal(store.values, before[1])
    keys = store.keys
    store.reorder(torch.tensor([1, 0]))
    assert torch.equal(store.keys, keys.flip(0))


def test_left_padded_rows_keep_padding_out_of_the_ranges() -> None:
    short, long = kv(n=20, seed=0), kv(n=48, seed=1)
    store = QuantizedStore.from_rows([short, long], quant.get("kivi", nbits=8, **SMALL))
    assert store.valid is not None and store.valid[0].sum() == 20 and store.length == 48
    row = store.row(0)
    assert row.keys.shape[-2] == 20 and row.positions[0, 0].tolist() == list(range(20))
    assert float((row.keys - short.keys).abs().max()) < 0.05


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
def test_tokens_for_memory_fits_exactly(nbits: int) -> None:
    quantizer = quant.get("kivi", nbits=nbits)
    heads, head_dim, capacity = 3, 64, 256
    tokens = tokens_for_memory(capacity, quantizer, heads, head_dim, dtype_bytes=2)
    budget = dense_nbytes(capacity, heads, head_dim)
    assert quantizer.stored_nbytes(tokens, heads, head_dim, 2) <= budget
    assert all(quantizer.stored_nbytes(t, heads, head_dim, 2) > budget for t in range(tokens + 1, tokens + 300))
    assert 0.75 * capacity * 16 / nbits < tokens <= capacity * 16 / nbits


@pytest.mark.parametrize("params,match", [
    (dict(nbits=3), "nbits must be one of 2, 4, 8"),
    (dict(nbits="4"), "nbits must be one of"),
    (dict(q_group_size=0), "q_group_size must be an integer of at least 1"),
    (dict(quant_residual_length=-1), "quant_residual_length"),
    (dict(rank=4), "does not accept rank"),
])
def test_bad_quantizer_parameters_are_clear_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quant.get("kivi", **params)


def test_unknown_quantizer_and_bad_value_group_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown quant_method 'kiwi'; accepted: gear, kivi, kvquant, layerquant"):
        quant.get("kiwi")
    with pytest.raises(ValueError, match="value_group_size=12 must divide head_dim=16"):
        QuantizedStore.from_rows([kv()], quant.get("kivi", value_group_size=12))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        quant.get("gear", rank=0)
    with pytest.raises(ValueError, match="outlier_ratio must be a number in"):
        quant.get("kvquant", outlier_ratio=1.5)
    with pytest.raises(ValueError, match="quant_layers_bits must be one of"):
        quant.get("layerquant", quant_layers_bits=5)
