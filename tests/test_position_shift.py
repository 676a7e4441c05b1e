"""StreamingLLM's position shift (positions inside the cache): a stream of many times a tiny model's
``max_position_embeddings`` runs with finite, stable PPL, the stored keys are exactly those of the kept tokens
rotated at their slots, and without the shift the streaming evaluator refuses with a clear error."""
from __future__ import annotations

import math

import pytest
import torch

import kvfactory
from kvfactory.benchmarks.ppl import streaming_ppl
from kvfactory.models import random_model

LIMIT = 64  # the tiny model's position limit
CACHE = 32  # 4 sinks + 28 recent


@pytest.fixture(scope="module")
def short_model():
    return random_model("tiny-llama", seed=1, max_position_embeddings=LIMIT)


def stream(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_streaming_past_four_times_the_position_limit_with_the_shift(short_model) -> None:
    tokens = stream(5 * LIMIT)  # 320 tokens: 5 × the position limit
    result = streaming_ppl(short_model, tokens, method="streamingllm", progress=False,
                           params={"max_capacity_prompt": CACHE, "decode_budget": CACHE, "position_shift": True})
    assert math.isfinite(result.ppl) and result.tokens == len(tokens) - 1
    quarter = len(result.window_nll) // 4
    quarters = [sum(result.window_nll[q * quarter : (q + 1) * quarter]) / quarter for q in range(4)]
    assert max(quarters) / min(quarters) < 1.15, quarters  # stable: no quarter of the stream blows up
    reference = streaming_ppl(short_model, tokens[:LIMIT], method="streamingllm", progress=False,
                              params={"max_capacity_prompt": CACHE, "decode_budget": CACHE, "position_shift": True})
    assert abs(math.log(result.ppl) - math.log(reference.ppl)) < 0.15  # the stream's PPL ≈ a within-limit stream's


def test_without_the_shift_the_stream_is_refused(short_model) -> None:
    with pytest.raises(ValueError, match="position_shift=True"):
        streaming_ppl(short_model, stream(4 * LIMIT), method="streamingllm", progress=False,
                      params={"max_capacity_prompt": CACHE, "decode_budget": CACHE})
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        streaming_ppl(short_model, stream(4 * LIMIT), method="fullkv", progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_shifted_keys_are_the_kept_tokens_rotated_at_their_slots(arch: str) -> None:
    """Layer 0's keys depend on the token only, so the shifted cache's layer-0 keys must equal those of a fresh,
    unpatched run over the kept tokens alone (positions 0..C-1); unshifted ones differ."""
    model = random_model(f"tiny-{arch}", seed=2)
    tokens = torch.tensor([stream(150, seed=3)])
    params = {"max_capacity_prompt": 20, "decode_budget": 20, "sink_size": 4}
    kept_keys = {}
    for shift in (True, False):
        with kvfactory.patch(model, "streamingllm", position_shift=shift, **params) as handle, torch.no_grad():
            cache = handle.new_cache()
            model(tokens[:, :40], past_key_values=cache, use_cache=True)  # prefill (compressed to 20), then stream
            for t in range(40, 150):
                model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
            positions = cache.kept_positions(0)[0, 0].long()
            kept_keys[shift] = cache[0][0]
    assert positions.tolist() == [0, 1, 2, 3, *range(134, 150)]
    with torch.no_grad():
        fresh = model(tokens[:, positions], use_cache=True).past_key_values
    fresh_keys = fresh[0][0] if not hasattr(fresh, "key_cache") else fresh.key_cache[0]
    assert torch.allclose(kept_keys[True], fresh_keys, atol=1e-4)
    assert not torch.allclose(kept_keys[False], fresh_keys, atol=1e-2)


def test_position_shift_needs_an_unpadded_batch() -> None:
    model = random_model("tiny-llama", seed=0)
    ids = torch.randint(3, 100, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with kvfactory.patch(model, "streamingllm", max_capacity_prompt=16, position_shift=True):
        with pytest.raises(ValueError, match="unpadded"):
            model(ids, attention_mask=mask, use_cache=True)
