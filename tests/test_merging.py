"""``merge=pivot|weighted``: evicted tokens folded into their most similar kept token; the length stays C."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvfactory
from kvfactory import methods
from tests.conftest import greedy, random_prompt, tiny_model


def merge_reference(keys, values, kept, mode):
    """One (batch, head) at a time, one evicted token at a time."""
    merged_keys = keys.gather(2, kept[..., None].expand(-1, -1, -1, keys.shape[-1])).clone()
    merged_values = values.gather(2, kept[..., None].expand(-1, -1, -1, keys.shape[-1])).clone()
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            kept_list = kept[b, h].tolist()
            evicted = [p for p in range(keys.shape[2]) if p not in kept_list]
            sums_k = torch.zeros_like(merged_keys[b, h])
            sums_v = torch.zeros_like(merged_values[b, h])
            mass = torch.zeros(len(kept_list))
            for d in evicted:
                cosine = F.cosine_similarity(keys[b, h, d][None], keys[b, h, kept_list], dim=-1)
                target = int(cosine.argmax())
                if mode == "pivot":
                    sums_k[target] += (keys[b, h, d] + merged_keys[b, h, target]) / 2
                    sums_v[target] += (values[b, h, d] + merged_values[b, h, target]) / 2
                    mass[target] += 1
                else:
                    weight = max((float(cosine.max()) + 1) / 2, 1e-6)
                    sums_k[target] += weight * keys[b, h, d]
                    sums_v[target] += weight * values[b, h, d]
                    mass[target] += weight
            merged_keys[b, h] = (merged_keys[b, h] + sums_k) / (1 + mass[:, None])
            merged_values[b, h] = (merged_values[b, h] + sums_v) / (1 + mass[:, None])
    return merged_keys, merged_values


@pytest.mark.parametrize("mode", ["pivot", "weighted"])
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "streamingllm"])
def test_merge_matches_reference_and_keeps_length(name: str, mode: str) -> None:
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=generator), torch.randn(2, 2, 40, 16, generator=generator),
               torch.randn(2, 2, 40, 16, generator=generator))
    plain = methods.get(name, max_capacity_prompt=16).compress_tokens(q, k, v, layer_idx=1, num_layers=2)
    merged = methods.get(name, max_capacity_prompt=16, merge=mode).compress_tokens(q, k, v, layer_idx=1, num_layers=2)
    assert torch.equal(merged.indices, plain.indices), "merging changes values, not the selection"
    assert merged.keys.shape == plain.keys.shape
    expected_keys, expected_values = merge_reference(k, v, plain.indices, mode)
    assert torch.allclose(merged.keys, expected_keys, atol=1e-5)
    assert torch.allclose(merged.values, expected_values, atol=1e-5)
    assert not torch.allclose(merged.values, plain.values)


def test_merge_in_a_model_keeps_the_budget() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16, merge="weighted") as handle:
        greedy(model, random_prompt(48), 4)
    assert handle.last_cache.kept_tokens() == [16 + 3, 16 + 3]


def test_unknown_merge_and_methods_without_merge_are_errors() -> None:
    with pytest.raises(ValueError, match="merge must be one of"):
        methods.get("h2o", merge="mean")
    for name in ("cam", "l2norm", "random", "adakv"):
        with pytest.raises(ValueError, match="does not accept merge"):
            methods.get(name, merge="pivot")
