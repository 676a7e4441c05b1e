"""Quantized storage inside patched models: composition with every eviction method, bytes, pruning, errors."""
from __future__ import annotations

import pytest
import torch

import kvfactory
from kvfactory import quant
from kvfactory.quant.budget import dense_nbytes, tokens_for_memory
from kvfactory.storage.quantized import QuantizedStore
from tests.conftest import greedy, random_prompt, tiny_model

CORE_METHODS = ["fullkv", "random", "streamingllm", "snapkv", "pyramidkv", "h2o", "l2norm", "cam"]
SMALL = dict(q_group_size=8, quant_residual_length=8)


def method_params(name: str) -> dict[str, object]:
    if name == "fullkv":
        return {}
    params: dict[str, object] = dict(max_capacity_prompt=40, decode_budget=48)
    if name == "l2norm":
        params["skip_layers"] = []
    return params


@pytest.mark.parametrize("quantizer", quant.names())
@pytest.mark.parametrize("name", CORE_METHODS)
def test_every_core_method_composes_with_every_quantizer(name: str, quantizer: str) -> None:
    model = tiny_model("llama")
    params = {**method_params(name), "quant_method": quantizer, "nbits": 2, **SMALL}
    if quantizer == "layerquant" and name == "fullkv":
        params["quant_pruning"] = False
    with kvfactory.patch(model, name, **params) as handle:
        tokens = greedy(model, random_prompt(80), 12)
        cache = handle.last_cache
    assert tokens.shape == (1, 12)
    assert all(isinstance(store, QuantizedStore) for store in cache.stores)
    assert any(store.blocks for store in cache.stores)
    assert cache.get_seq_length() == 91
    if name != "fullkv":  # the decode budget holds (converted to quantized tokens for quantized pruning)
        for layer, store in enumerate(cache.stores):
            assert store.length <= handle.method.capacity(layer, 2, 91, 48)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt-neox"])
def test_quantized_logits_close_to_full_precision_and_better_with_bits(arch: str) -> None:
    model = tiny_model(arch)
    ids = random_prompt(96, seed=5)
    with kvfactory.patch(model, "fullkv"), torch.no_grad():
        exact = model(ids).logits[:, 64:]
    errors = []
    for nbits in (2, 4, 8):
        with kvfactory.patch(model, "fullkv", quant_method="kvquant", nbits=nbits, **SMALL) as handle, torch.no_grad():
            cache = handle.new_cache()
            model(ids[:, :64], past_key_values=cache, use_cache=True)
            logits = model(ids[:, 64:], past_key_values=cache, use_cache=True).logits
        errors.append(float((logits - exact).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05 * float(exact.abs().max())


def test_cache_bytes_equal_the_arithmetic_in_a_patched_model() -> None:
    model = tiny_model("llama")  # 2 layers, 2 KV heads, head_dim 16, fp32
    quantizer = quant.get("gear", nbits=4, **SMALL)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=36, quant_method="gear", nbits=4, **SMALL) as handle:
        with torch.no_grad():
            cache = model(random_prompt(80), use_cache=True).past_key_values
    assert handle.storage.describe()["quant_method"] == "gear"
    assert cache.kept_tokens() == [36, 36]
    assert kvfactory.cache_nbytes(cache) == 2 * quantizer.stored_nbytes(36, heads=2, head_dim=16, dtype_bytes=4)


def test_suffix_in_residual_sized_chunks_equals_token_by_token_decoding() -> None:
    model = tiny_model("llama")
    ids = random_prompt(64, seed=2)
    params = dict(quant_method="kivi", nbits=2, **SMALL)
    with kvfactory.patch(model, "fullkv", **params) as handle, torch.no_grad():
        cache = handle.new_cache()
        model(ids[:, :32], past_key_values=cache, use_cache=True)
        chunked = torch.cat([model(ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits
                             for s in range(32, 64, 8)], dim=1)
        cache = handle.new_cache()
        model(ids[:, :32], past_key_values=cache, use_cache=True)
        single = torch.cat([model(ids[:, s : s + 1], past_key_values=cache, use_cache=True).logits
                            for s in range(32, 64)], dim=1)
    assert torch.allclose(chunked, single, atol=1e-4)


def test_quantized_pruning_keeps_more_tokens_in_the_same_memory() -> None:
    model = tiny_model("llama")
    ids = random_prompt(400)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=48) as handle, torch.no_grad():
        full_kept = model(ids, use_cache=True).past_key_values.kept_tokens()
    expected = tokens_for_memory(48, quant.get("kivi", nbits=2, **SMALL), 2, 16, dtype_bytes=4)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=48, quant_method="kivi", nbits=2, quant_pruning=True,
                         **SMALL) as handle, torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert full_kept == [48, 48] and cache.kept_tokens() == [expected, expected] and expected > 2 * 48
    assert kvfactory.cache_nbytes(cache) <= 2 * dense_nbytes(48, 2, 16)
    assert handle.method.describe()["quant_pruning"] is True


def test_layerquant_gives_each_layer_its_bits_and_token_count() -> None:
    model = tiny_model("llama")
    params = dict(quant_method="layerquant", nbits=2, quant_layers_bits=16, quant_begin_layers=0, quant_end_layers=1,
                  **SMALL)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=48, **params) as handle, torch.no_grad():
        cache = model(random_prompt(400), use_cache=True).past_key_values
    dense, quantized = cache.stores
    assert not isinstance(dense, QuantizedStore) and isinstance(quantized, QuantizedStore)
    assert cache.kept_tokens()[0] == 48 and cache.kept_tokens()[1] > 2 * 48
    assert handle.storage.quantizers[1].nbits == 2


def test_context_reuse_rolls_back_exactly() -> None:
    model = tiny_model("llama")
    ids = random_prompt(60)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=40, quant_method="kivi", nbits=4, **SMALL) as handle:
        cache = handle.new_cache()
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            keys = cache[0][0].clone()
            mark = cache.mark()
            question = random_prompt(30, seed=4)
            first = model(question, past_key_values=cache, use_cache=True).logits
            cache.rollback(mark)
            assert torch.equal(cache[0][0], keys)
            again = model(question, past_key_values=cache, use_cache=True).logits
    assert torch.equal(first, again)


def test_beam_search_reorders_quantized_stores() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=24, quant_method="kivi", nbits=4, **SMALL):
        tokens = greedy(model, random_prompt(50), 6, num_beams=2)
    assert tokens.shape == (1, 6)


@pytest.mark.parametrize("method,params,match", [
    ("snapkv", dict(quant_method="kivi", nbits=3), "nbits must be one of 2, 4, 8"),
    ("snapkv", dict(quant_method="kivi", value_group_size=5), "value_group_size=5 must divide head_dim=16"),
    ("snapkv", dict(quant_method="zip", nbits=2), "unknown quant_method 'zip'"),
    ("snapkv", dict(nbits=2), "nbits given without quant_method"),
    ("snapkv", dict(quant_method="kivi", rank=2), "does not accept rank"),
    ("adakv", dict(scorer="headkv", quant_method="kivi"), "scorer 'headkv' is itself head-wise"),
    ("fullkv", dict(quant_method="kivi", quant_pruning=True), "method 'fullkv' has no budget"),
])
def test_bad_quantization_arguments_are_clear_errors(method: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kvfactory.patch(tiny_model("llama"), method, **params)


@pytest.mark.parametrize("quantizer", quant.names())
def test_runner_flags_reach_the_quantized_storage(quantizer: str) -> None:
    import argparse

    from kvfactory.benchmarks.common import add_method_arguments, add_model_arguments, patch_parameters

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_method_arguments(parser)
    args = parser.parse_args(["--method", "snapkv", "--max_capacity_prompts", "32", "--quant_method", quantizer,
                              "--nbits", "2", "--method_kwargs", '{"q_group_size": 8}'])
    name, params = patch_parameters(args)
    with kvfactory.patch(tiny_model("llama"), name, **params) as handle, torch.no_grad():
        handle.model(random_prompt(64), use_cache=True)
    assert all(isinstance(store, QuantizedStore) and store.quantizer.nbits == 2 and store.quantizer.q_group_size == 8
               for store in handle.last_cache.stores[1:])
