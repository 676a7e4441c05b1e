"""Composition by wrappers: AdaKV's head-wise allocation over other scorers (against a naive reference), per-layer
budgets, a decode-time method, and quantization of head-wise methods with real bytes."""
from __future__ import annotations

import math

import pytest
import torch

import kvfactory
from kvfactory import methods
from kvfactory.attention import AttentionSpec
from kvfactory.models import random_model
from kvfactory.storage.quantized import QuantizedRaggedStore
from kvfactory.storage.ragged import RaggedStore
from tests.conftest import greedy, random_prompt, tiny_model
from tests.test_methods_kept import HKV, HQ, N, group, naive_causal_attention

C = 20


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return (torch.randn(2, HQ, N, 16, generator=generator), torch.randn(2, HKV, N, 16, generator=generator),
            torch.randn(2, HKV, N, 16, generator=generator))


def naive_allocation(past: torch.Tensor, budget: int, floor_ratio: float, normalize: bool) -> list[list[int]]:
    """Past tokens per (sample, head): AdaKV's competition over the layer's scores, then the floor plus each head's
    share of the rest, rounded by largest remainder (ties: the lower head) so the layer total is exact."""
    caps = []
    for b in range(past.shape[0]):
        entries = []
        for h in range(past.shape[1]):
            ranked = sorted(past[b, h].tolist(), reverse=True)
            scale = sum(ranked[:budget]) / sum(ranked) if normalize else 1.0
            entries += [(value * scale, h) for value in ranked]
        won = [0] * past.shape[1]
        for _, h in sorted(entries, key=lambda e: -e[0])[: past.shape[1] * budget]:
            won[h] += 1
        floor = int(budget * floor_ratio)
        rest = past.shape[1] * (budget - floor)
        shares = [w * rest / (past.shape[1] * budget) for w in won]
        head_caps = [math.floor(s) for s in shares]
        by_remainder = sorted(range(len(shares)), key=lambda h: (-(shares[h] - head_caps[h]), h))
        for h in by_remainder[: rest - sum(head_caps)]:
            head_caps[h] += 1
        caps.append([cap + floor for cap in head_caps])
    return caps


def naive_kept(past: torch.Tensor, caps: list[list[int]], n: int) -> list[list[set[int]]]:
    window = set(range(past.shape[-1], n))
    return [[set(sorted(range(past.shape[-1]), key=lambda j: -past[b, h, j].item())[: caps[b][h]]) | window
             for h in range(past.shape[1])] for b in range(past.shape[0])]


def mask_sets(keep: torch.Tensor) -> list[list[set[int]]]:
    return [[set(keep[b, h].nonzero().flatten().tolist()) for h in range(keep.shape[1])] for b in range(keep.shape[0])]


@pytest.mark.parametrize("floor_ratio", [0.2, 0.5])
def test_headwise_allocation_over_h2o_scores_matches_naive_reference(qkv, floor_ratio: float) -> None:
    q, k, v = qkv
    method = methods.get("adakv", scorer="h2o", max_capacity_prompt=C, floor_ratio=floor_ratio)
    keep = method.select_mask(q, k, v)
    window = method.window_size
    past = group(naive_causal_attention(q, k).sum(dim=2))[..., : N - window]  # H2O: column sums, group mean
    caps = naive_allocation(past, C - window, floor_ratio, normalize=True)
    assert mask_sets(keep) == naive_kept(past, caps, N)
    assert keep.sum(dim=(1, 2)).tolist() == [HKV * C] * 2
    assert len({int(c) for c in keep.sum(-1).flatten()}) > 1  # the heads really differ


def test_headwise_allocation_over_l2norm_scores_matches_naive_reference(qkv) -> None:
    q, k, v = qkv
    method = methods.get("adakv", scorer="l2norm", max_capacity_prompt=C, skip_layers=[])
    keep = method.select_mask(q, k, v)
    past = -k.norm(dim=-1)  # L2Norm keeps low-norm keys; no window by default; not attention mass: no normalizing
    caps = naive_allocation(past, C, 0.2, normalize=False)
    assert mask_sets(keep) == naive_kept(past, caps, N)
    assert keep.sum(dim=(1, 2)).tolist() == [HKV * C] * 2


def test_default_adakv_is_unchanged_and_scorer_is_a_wrapper() -> None:
    assert type(methods.get("adakv")) is methods.AdaKV
    wrapped = methods.get("adakv", scorer="snapkv", max_capacity_prompt=32, kernel_size=5)
    assert isinstance(wrapped, methods.HeadwiseAllocation) and wrapped.layout == "ragged"
    assert wrapped.describe()["scorer"] == "snapkv" and wrapped.describe()["kernel_size"] == 5
    with pytest.raises(ValueError, match="accepted by adakv"):
        methods.get("snapkv", scorer="h2o")
    with pytest.raises(ValueError, match="does not accept beta"):
        methods.get("adakv", scorer="h2o", beta=3)
    with pytest.raises(ValueError, match="sink_size and merge are not supported"):
        methods.get("adakv", scorer="h2o", sink_size=4)


@pytest.mark.parametrize("scorer", ["h2o", "l2norm", "snapkv", "pyramidkv"])
def test_headwise_allocation_in_a_model_holds_hkv_times_c_per_layer(scorer: str) -> None:
    model = tiny_model("llama")
    params = dict(skip_layers=[]) if scorer == "l2norm" else {}
    with kvfactory.patch(model, "adakv", scorer=scorer, max_capacity_prompt=C, **params) as handle:
        with torch.no_grad():
            model(random_prompt(60), use_cache=True)
        cache = handle.last_cache
        for layer, store in enumerate(cache.stores):
            capacity = handle.method.capacity(layer, 2, 60)
            assert int(store.head_lengths().sum()) == HKV * capacity
            positions = cache.kept_positions(layer)  # ragged stores have positions too (-1: padding)
            assert positions.shape[:2] == (1, HKV) and int((positions >= 0).sum()) == HKV * capacity
        tokens = greedy(model, random_prompt(60), 5)
    assert tokens.shape == (1, 5)


@pytest.mark.parametrize("scorer", ["snapkv", "l2norm"])
def test_headwise_allocation_holds_a_decode_budget(scorer: str) -> None:
    model = tiny_model("llama")
    params = dict(skip_layers=[]) if scorer == "l2norm" else {}
    with kvfactory.patch(model, "adakv", scorer=scorer, max_capacity_prompt=20, decode_budget=24, **params) as handle:
        greedy(model, random_prompt(40), 30)
        cache = handle.last_cache
    assert sum(cache.compressions) > 0
    assert all(kept <= 24 for kept in cache.mean_kept_tokens()), cache.mean_kept_tokens()
    with pytest.raises(ValueError, match="per-slot accumulators"):
        methods.get("adakv", scorer="h2o", decode_budget=24)


def test_per_layer_budgets_as_a_list_or_a_function() -> None:
    model = tiny_model("llama")
    for budgets in ([12, 24], lambda layer, layers: 12 * (layer + 1)):
        with kvfactory.patch(model, "snapkv", max_capacity_prompt=budgets) as handle, torch.no_grad():
            model(random_prompt(40), use_cache=True)
            assert handle.last_cache.kept_tokens() == [12, 24]
    with pytest.raises(ValueError, match="at least 9"):
        methods.get("snapkv", max_capacity_prompt=[12, 4])
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=[12, 24, 36]), pytest.raises(ValueError,
                                                                                       match="one per layer"):
        model(random_prompt(40))


def test_decode_method_differs_from_the_prefill_method() -> None:
    model = tiny_model("llama")
    prompt = random_prompt(40)
    with kvfactory.patch(model, "h2o", max_capacity_prompt=16) as handle, torch.no_grad():
        model(prompt, use_cache=True)
        h2o_positions = [handle.last_cache.kept_positions(layer).clone() for layer in range(2)]
    with kvfactory.patch(model, "h2o", max_capacity_prompt=16, decode_method="snapkv", decode_budget=20) as handle:
        assert handle.method.decode_method.name == "snapkv" and handle.method.query_window_size == 8
        with torch.no_grad():
            model(prompt, use_cache=True)
            assert all(torch.equal(handle.last_cache.kept_positions(layer), h2o_positions[layer]) for layer in range(2))
        greedy(model, prompt, 30)
        cache = handle.last_cache
    assert max(cache.kept_tokens()) <= 20 and sum(cache.compressions) > 0
    with pytest.raises(ValueError, match="needs decode_budget"):
        methods.get("h2o", decode_method="snapkv")


def bf16_model() -> torch.nn.Module:
    """A tiny Llama with real head dimensions (128) in bfloat16, so bytes compare as they would at 16 bits."""
    return random_model("tiny-llama", hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                        dtype="bfloat16")


def test_adakv_with_kivi_quantizes_the_ragged_store_with_real_bytes() -> None:
    """adakv + kivi-4 ≤ 0.30 × adakv bytes at 16 bits, adakv + kivi-2 ≤ 0.20 (what benchmarks/quantization.py
    prints on SmolLM2), and the quantized head-wise cache still generates."""
    model = bf16_model()
    prompt = random_prompt(600)
    nbytes = {}
    for label, params in (("fp16", {}), ("kivi-4", dict(quant_method="kivi", nbits=4)),
                          ("kivi-2", dict(quant_method="kivi", nbits=2))):
        with kvfactory.patch(model, "adakv", max_capacity_prompt=256, **params) as handle, torch.no_grad():
            model(prompt, use_cache=True)
            cache = handle.last_cache
            nbytes[label] = cache.nbytes()
            assert all(isinstance(s, QuantizedRaggedStore) == bool(params) for s in cache.stores)
            assert all(abs(int(s.head_lengths().sum()) - 2 * 256) <= 2 for s in cache.stores)  # AdaKV's rounding
            greedy(model, prompt[:, :300], 3)
    assert nbytes["kivi-4"] <= 0.30 * nbytes["fp16"], nbytes
    assert nbytes["kivi-2"] <= 0.20 * nbytes["fp16"], nbytes


@pytest.mark.parametrize("quantizer", ["kivi", "kvquant", "gear"])
def test_quantized_ragged_attention_equals_attention_over_its_dequantized_tokens(quantizer: str) -> None:
    generator = torch.Generator().manual_seed(3)
    batch, n, d = 2, 64, 16
    keys = torch.randn(batch, HKV, n + 2, d, generator=generator)
    values = torch.randn(batch, HKV, n + 2, d, generator=generator)
    positions = torch.arange(n).expand(batch, HKV, -1)
    keep = torch.rand(batch, HKV, n, generator=generator) < 0.5
    plain = RaggedStore.from_mask(keys[:, :, :n], values[:, :, :n], positions, keep)
    params = dict(nbits=4, q_group_size=8, quant_residual_length=8)
    rotate = (lambda states, pos, inverse: states) if quantizer == "kvquant" else None
    store = QuantizedRaggedStore.quantize(plain, kvfactory.quant.get(quantizer, **params), rotate)
    assert store.quantized_rows == int(keep.sum()) and store.nbytes() < plain.nbytes()
    reference = RaggedStore.from_mask(*store.padded())  # the same (dequantized) tokens, in full precision
    assert torch.equal(reference.flat_positions, plain.flat_positions)
    assert (reference.flat_keys - plain.flat_keys).abs().max() < 0.5  # 4-bit error, not garbage
    for target in (store, reference):
        target.append(keys[:, :, n:], values[:, :, n:], torch.tensor([[n, n + 1]] * batch))
    queries = torch.randn(batch, HQ, 2, d, generator=generator)
    spec = AttentionSpec("sdpa", None)
    query_positions = torch.tensor([[n, n + 1]] * batch)
    got, _ = store.attend(queries, spec, query_positions=query_positions)
    expected, _ = reference.attend(queries, spec, query_positions=query_positions)
    assert (got - expected).abs().max() < 1e-5
    snapshot = store.snapshot()
    store.append(keys[:, :, :1], values[:, :, :1], torch.tensor([[n + 2]] * batch))
    store.restore(snapshot)
    assert store.tail_length == 2 and store.mean_kept() == reference.mean_kept()


def test_runner_flags_compose_a_scorer() -> None:
    import argparse

    from kvfactory.benchmarks.common import add_method_arguments, add_model_arguments, method_label, patch_parameters

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_method_arguments(parser)
    args = parser.parse_args(["--method", "adakv", "--max_capacity_prompts", "16", "--prefill_chunk_size", "32",
                              "--method_kwargs", '{"scorer": "l2norm", "skip_layers": []}'])
    name, params = patch_parameters(args)
    assert method_label(name, params) == "adakv_scorer-l2norm_chunk32"
    with kvfactory.patch(tiny_model("llama"), name, **params) as handle, torch.no_grad():
        handle.model(random_prompt(40), use_cache=True)
    assert handle.method.describe()["scorer"] == "l2norm" and handle.method.prefill_chunk_size == 32
    assert [int(store.head_lengths().sum()) for store in handle.last_cache.stores] == [HKV * 16] * 2


@pytest.mark.parametrize("name", ["snapkv", "adakv", "streamingllm"])
def test_chunked_prefill_bounds_each_layer_and_generates(name: str) -> None:
    """A 100-token prompt in chunks of 16 with C=24: after each chunk every layer is back at C (so it never holds
    more than C + 16), the logical length is the prompt's, and generation continues from the compressed cache."""
    model = tiny_model("llama")
    prompt = random_prompt(100)
    peaks: list[int] = []
    with kvfactory.patch(model, name, max_capacity_prompt=24, prefill_chunk_size=16) as handle:
        original = handle.last_cache
        with torch.no_grad():
            cache = handle.new_cache()
            forward_layer = cache.forward_layer

            def watched(layer_idx, *args):
                output = forward_layer(layer_idx, *args)
                store = cache.stores[layer_idx]
                peaks.append(int(store.head_lengths().max()) if hasattr(store, "head_lengths") else store.length)
                return output

            cache.forward_layer = watched
            logits = model(prompt, past_key_values=cache, use_cache=True).logits
        assert logits.shape[1] == 100 and cache.get_seq_length() == 100 and original is None
        assert max(cache.mean_kept_tokens()) <= 24 and max(peaks) <= 24 + 16 and len(peaks) == 2 * 7
        assert cache.prefill_kept == [[24], [24]] or name == "adakv"
        tokens = greedy(model, prompt, 5)
    assert tokens.shape == (1, 5)


def test_chunked_prefill_of_fullkv_equals_the_unchunked_logits() -> None:
    model = tiny_model("llama")
    prompt = random_prompt(50)
    with torch.no_grad():
        expected = model(prompt).logits
        with kvfactory.patch(model, "fullkv", prefill_chunk_size=16):
            chunked = model(prompt, use_cache=True).logits
    assert (chunked - expected).abs().max() < 1e-4
    with pytest.raises(ValueError, match="whole prompt"):
        methods.get("h2o", prefill_chunk_size=16)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "adakv"])
def test_saved_and_loaded_cache_gives_the_live_answer(tmp_path, name: str) -> None:
    model = tiny_model("llama")
    prompt = random_prompt(60)
    path = tmp_path / "context.safetensors"
    params = dict(max_capacity_prompt=20, decode_budget=24) if name == "h2o" else dict(max_capacity_prompt=20)
    with kvfactory.patch(model, name, **params) as handle, torch.no_grad():
        cache = handle.new_cache()
        model(prompt[:, :-1], past_key_values=cache, use_cache=True)
        handle.save_cache(str(path), cache)
        live = greedy(model, prompt, 12, past_key_values=cache)
        loaded = handle.load_cache(str(path))
        assert loaded.get_seq_length() == 59 and loaded.kept_tokens() == handle.load_cache(str(path)).kept_tokens()
        assert torch.equal(greedy(model, prompt, 12, past_key_values=loaded), live)
    with kvfactory.patch(tiny_model("llama", seed=1), name, **params) as other, pytest.raises(ValueError,
                                                                                              match="another model"):
        other.load_cache(str(path))
    with kvfactory.patch(model, name, max_capacity_prompt=24) as other, pytest.raises(ValueError,
                                                                                      match="another method"):
        other.load_cache(str(path))
