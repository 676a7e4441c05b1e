"""The compressed cache inside a patched model: KV-head storage, real bytes, positions, decode-time budgets."""
from __future__ import annotations

import pytest
import torch

import kvfactory
from kvfactory import methods
from tests.conftest import greedy, method_params, random_prompt, tiny_model

BUDGETED = [name for name in methods.names() if name != "fullkv"]


def test_gqa_cache_holds_kv_heads_and_bytes_match_arithmetic() -> None:
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16, 2 layers, fp32
    ids = random_prompt(80)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=24) as handle, torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert handle.last_cache is cache
    for layer in range(2):
        keys, values = cache[layer]
        assert keys.shape == values.shape == (1, 2, 24, 16)
        assert cache.kept_positions(layer).shape == (1, 2, 24)
    per_token = 2 * (2 * 16 * 4) + 2 * 4  # K and V at 2 heads × 16 dims × fp32, plus an int32 position per head
    assert kvfactory.cache_nbytes(cache) == 2 * 24 * per_token
    with kvfactory.patch(model, "fullkv"), torch.no_grad():
        full = model(ids, use_cache=True).past_key_values
    assert kvfactory.cache_nbytes(full) == 2 * 80 * per_token
    with torch.no_grad():
        stock = model(ids, use_cache=True).past_key_values
    assert kvfactory.cache_nbytes(stock) == 2 * 80 * 2 * (2 * 16 * 4)


def test_logical_length_tracks_every_token_after_eviction() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16) as handle:
        greedy(model, random_prompt(50), 7)
        cache = handle.last_cache
    assert cache.get_seq_length() == 56  # 50 prompt tokens + 6 fed-back tokens (the 7th is never fed)
    assert cache.kept_tokens() == [16 + 6, 16 + 6]
    assert cache.kept_positions(0)[0, 0, -6:].tolist() == list(range(50, 56))


@pytest.mark.parametrize("name", BUDGETED)
def test_every_method_generates_like_fullkv_when_budget_covers_prompt(arch: str, name: str) -> None:
    model = tiny_model(arch)
    ids = random_prompt(40, seed=3)
    expected = greedy(model, ids, 10)
    with kvfactory.patch(model, name, **method_params(name, max_capacity_prompt=40)):
        assert torch.equal(greedy(model, ids, 10), expected)


# budgets that are not a per-layer token count while decoding (tests/test_frontier_methods.py covers them): Quest
# keeps everything, SimLayerKV trims lazy layers only, DuoAttention trims streaming heads only, KVzip compresses the
# context once
CONDITIONAL_DECODE_BUDGET = ("quest", "simlayerkv", "duo_attention", "kvzip")


@pytest.mark.parametrize("name", [name for name in BUDGETED if name not in CONDITIONAL_DECODE_BUDGET])
def test_decode_budget_holds_after_50_tokens(name: str) -> None:
    model = tiny_model("llama")
    params = method_params(name, max_capacity_prompt=20, decode_budget=24)
    if name == "l2norm":
        params["skip_layers"] = []
    with kvfactory.patch(model, name, **params) as handle:
        greedy(model, random_prompt(40), 50)
        cache = handle.last_cache
    for layer, kept in enumerate(cache.mean_kept_tokens()):
        capacity = handle.method.capacity(layer, 2, cache.get_seq_length(), 24)
        if hasattr(handle.method, "layer_token_budget"):  # head-wise: a per-layer total shared unevenly by heads
            capacity = handle.method.layer_token_budget(capacity, layer, 2, 4, 2) / 2
        assert kept <= capacity, (name, layer, kept)
    assert cache.get_seq_length() == 89


def test_compress_interval_bounds_the_cache() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=20, decode_budget=20, compress_interval=5) as handle:
        sizes = []
        cache = handle.new_cache()
        with torch.no_grad():
            output = model(random_prompt(30), past_key_values=cache, use_cache=True)
            for _ in range(12):
                output = model(output.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
                sizes.append(cache.kept_tokens()[0])
    assert max(sizes) <= 24 and min(sizes) == 20 and sizes.count(20) >= 2


def test_streamingllm_rolls_its_window() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "streamingllm", max_capacity_prompt=12, sink_size=4, decode_budget=12) as handle:
        greedy(model, random_prompt(30), 20)
        cache = handle.last_cache
    seen = cache.get_seq_length()
    for layer in range(2):
        positions = cache.kept_positions(layer)[0]
        assert all(row.tolist() == [0, 1, 2, 3] + list(range(seen - 8, seen)) for row in positions)


def test_h2o_decoding_evicts_the_lowest_accumulated_score() -> None:
    """Each step appends one token and evicts one: the evicted token's accumulated score (recoverable because
    every new query's weights sum to 1 per KV head) is the lowest among the evictable tokens."""
    model = tiny_model("llama-mha")  # one query per KV head: accumulators are plain attention sums
    window = 3
    with kvfactory.patch(model, "h2o", max_capacity_prompt=12, window_size=window, decode_budget=12) as handle:
        cache = handle.new_cache()
        with torch.no_grad():
            output = model(random_prompt(30), past_key_values=cache, use_cache=True)
            for _ in range(8):
                store = cache.stores[1]
                before_positions, before_scores = store.positions.clone(), store.extra("scores").clone()
                output = model(output.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
                store = cache.stores[1]
                after_positions, after_scores = store.positions, store.extra("scores")
                for head in range(after_positions.shape[1]):
                    old = before_positions[0, head].tolist()
                    new = after_positions[0, head].tolist()
                    (evicted,) = set(old) - set(new)
                    old_score = dict(zip(old, before_scores[0, head].tolist()))
                    gained = {p: s - old_score.get(p, 0.0) for p, s in zip(new, after_scores[0, head].tolist())}
                    evicted_score = old_score[evicted] + 1.0 - sum(gained.values())
                    evictable = [s for p, s in zip(new, after_scores[0, head].tolist()) if p not in new[-window:]]
                    assert evicted not in old[-window + 1:]
                    assert evicted_score <= min(evictable) + 1e-5


def test_positions_stay_right_after_eviction(arch: str) -> None:
    """After StreamingLLM compresses the prompt, the next token's logits equal the unpatched model's when that
    token attends only the kept positions (a custom mask), i.e. the new token got its true position and RoPE."""
    model = tiny_model(arch, "eager")
    ids = random_prompt(40, seed=5)
    next_token = torch.tensor([[7]])
    kept = list(range(4)) + list(range(28, 40))
    with kvfactory.patch(model, "streamingllm", max_capacity_prompt=16, sink_size=4) as handle, torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        patched = model(next_token, past_key_values=cache, use_cache=True).logits[0, -1]
    full = torch.cat([ids, next_token], dim=1)
    if arch == "gpt-neox":
        pytest.skip("GPT-NeoX 4.44.2 takes no custom 4-D mask; its positions are covered by the decode-loop tests")
    allowed = torch.ones(41, 41).tril().bool()
    allowed[40] = False
    allowed[40, kept + [40]] = True
    window = handle.spec.sliding_window
    if window is not None:  # Mistral: the reference mask needs the sliding window the patched model applies
        distance = torch.arange(41)[:, None] - torch.arange(41)[None, :]
        allowed &= distance < window
    mask = torch.zeros(1, 1, 41, 41).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        reference = model(full, attention_mask=mask).logits[0, -1]
    assert (patched - reference).abs().max().item() <= 1e-4
