"""A patched model with ``fullkv`` is the unpatched model: same logits, same generations; removal restores it."""
from __future__ import annotations

import pytest
import torch

import kvfactory
from tests.conftest import decode_loop, greedy, random_prompt, tiny_model


def test_fullkv_logits_equal_unpatched(arch: str, implementation: str) -> None:
    model = tiny_model(arch, implementation)
    ids = random_prompt(40)
    with torch.no_grad():
        reference = model(ids).logits
        with kvfactory.patch(model, "fullkv"):
            patched = model(ids).logits
        restored = model(ids).logits
    assert (patched - reference).abs().max().item() <= 1e-5
    assert torch.equal(restored, reference)


def test_fullkv_decoding_logits_equal_unpatched(arch: str, implementation: str) -> None:
    """A hand-written decode loop matches the stock cache step by step, and the logical length is right."""
    model = tiny_model(arch, implementation)
    ids = random_prompt(30)
    reference, _ = decode_loop(model, ids, 6)
    with kvfactory.patch(model, "fullkv"):
        patched, cache = decode_loop(model, ids, 6)
    for expected, actual in zip(reference, patched):
        assert (expected - actual).abs().max().item() <= 1e-5
    assert cache.get_seq_length() == 36


def test_generation_identical(arch: str, implementation: str) -> None:
    model = tiny_model(arch, implementation)
    ids = random_prompt(33)
    expected = greedy(model, ids, 12)
    with kvfactory.patch(model, "fullkv"):
        assert torch.equal(greedy(model, ids, 12), expected)
        assert torch.equal(greedy(model, ids, 12), expected)  # a second generate() starts a fresh cache


def test_patch_is_per_instance() -> None:
    """Two models of the same class in one process run different methods."""
    first, second = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    ids = random_prompt(60)
    with kvfactory.patch(first, "snapkv", max_capacity_prompt=16) as compressed, kvfactory.patch(second, "fullkv") as full:
        greedy(first, ids, 3)
        greedy(second, ids, 3)
        assert compressed.last_cache.kept_tokens() == [16 + 2] * 2
        assert full.last_cache.kept_tokens() == [60 + 2] * 2
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_remove_is_idempotent_and_allows_repatching() -> None:
    model = tiny_model("llama")
    handle = kvfactory.patch(model, "snapkv", max_capacity_prompt=16)
    with pytest.raises(ValueError, match="already patched"):
        kvfactory.patch(model, "fullkv")
    handle.remove()
    handle.remove()
    kvfactory.patch(model, "h2o", max_capacity_prompt=16).remove()
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    assert "forward" not in model.model.__dict__
