"""Which tokens each method keeps, checked against small independent references written here (explicit repeat_kv,
full n × n attention, Python loops)."""
from __future__ import annotations

import math

import pytest
import torch

from kvfactory import methods
from tests.conftest import method_params, synthetic_head_scores

B, HQ, HKV, N, D = 2, 4, 2, 50, 16
GROUPS = HQ // HKV


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(B, HQ, N, D, generator=generator)
    k = torch.randn(B, HKV, N, D, generator=generator)
    v = torch.randn(B, HKV, N, D, generator=generator)
    return q, k, v


def naive_causal_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full causal attention ``(B, Hq, n, n)`` with keys repeated to the query heads."""
    repeated = k.repeat_interleave(GROUPS, dim=1)
    logits = q @ repeated.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = k.shape[-2]
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def group(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    grouped = scores.view(scores.shape[0], HKV, GROUPS, *scores.shape[2:])
    return {"mean": grouped.mean(2), "max": grouped.amax(2), "sum": grouped.sum(2)}[how]


def maxpool_loop(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    pooled = torch.empty_like(scores)
    half = kernel // 2
    for j in range(scores.shape[-1]):
        pooled[..., j] = scores[..., max(0, j - half) : j + half + 1].amax(-1)
    return pooled


def kept_sets(indices: torch.Tensor) -> list[list[set[int]]]:
    return [[set(indices[b, h].tolist()) for h in range(indices.shape[1])] for b in range(indices.shape[0])]


def top_sets(past_scores: torch.Tensor, keep: int, window: int, n: int = N) -> list[list[set[int]]]:
    window_set = set(range(n - window, n))
    return [
        [set(past_scores[b, h].topk(keep).indices.tolist()) | window_set for h in range(past_scores.shape[1])]
        for b in range(past_scores.shape[0])
    ]


def snapkv_reference(q, k, window, kernel, how="mean", pooled=True):
    attention = naive_causal_attention(q, k)[..., -window:, : N - window].sum(-2)  # (B, Hq, past)
    scores = group(attention, how)
    return maxpool_loop(scores, kernel) if pooled else scores


def test_fullkv_keeps_everything(qkv) -> None:
    q, k, v = qkv
    keys, values = methods.get("fullkv").compress(q, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)


def test_streamingllm_keeps_sinks_and_recent(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("streamingllm", max_capacity_prompt=20, sink_size=4).compress_tokens(q, k, v)
    expected = set(range(4)) | set(range(N - 16, N))
    assert all(s == expected for row in kept_sets(kept.indices) for s in row)
    assert torch.equal(kept.keys, k[:, :, sorted(expected)])


@pytest.mark.parametrize("how", ["mean", "max", "sum"])
def test_snapkv_matches_reference(qkv, how: str) -> None:
    q, k, v = qkv
    method = methods.get("snapkv", max_capacity_prompt=20, window_size=6, kernel_size=5, gqa_score_agg=how)
    kept = method.compress_tokens(q, k, v)
    assert kept_sets(kept.indices) == top_sets(snapkv_reference(q, k, 6, 5, how), 14, 6)
    assert kept.keys.shape == (B, HKV, 20, D)
    assert torch.equal(kept.values, v.gather(2, kept.indices[..., None].expand(-1, -1, -1, D)))


def test_snapkv_avgpool_counts_padding(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("snapkv", max_capacity_prompt=20, window_size=6, kernel_size=5, pooling="avgpool").compress_tokens(q, k, v)
    scores = snapkv_reference(q, k, 6, 1, pooled=False)
    padded = torch.nn.functional.pad(scores, (2, 2))
    averaged = torch.stack([padded[..., j : j + 5].sum(-1) / 5 for j in range(scores.shape[-1])], dim=-1)
    assert kept_sets(kept.indices) == top_sets(averaged, 14, 6)


def test_pyramidkv_schedule_and_selection(qkv) -> None:
    schedule = methods.get("pyramidkv", max_capacity_prompt=128, window_size=8)
    # KVCache-Factory's worked example: C=128, W=8, L=32 -> layer 0 keeps 234 + 8, layer 31 keeps 17 + 8
    assert schedule.capacity(0, 32, 4000) == 242 and schedule.capacity(31, 32, 4000) == 25
    assert schedule.capacity(5, 32, 100) == 100  # shorter than C: everything
    assert schedule.capacity(5, 32, 200) == 128  # shorter than 2(C - W): SnapKV's budget
    q, k, v = qkv
    method = methods.get("pyramidkv", max_capacity_prompt=16, window_size=4, kernel_size=3)
    reference = snapkv_reference(q, k, 4, 3)
    for layer in range(4):
        capacity = method.capacity(layer, 4, N)
        kept = method.compress_tokens(q, k, v, layer_idx=layer, num_layers=4)
        assert kept.indices.shape[-1] == capacity
        assert kept_sets(kept.indices) == top_sets(reference, capacity - 4, 4)


def test_h2o_matches_full_attention_column_sums(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("h2o", max_capacity_prompt=18, window_size=5).compress_tokens(q, k, v)
    column_sums = group(naive_causal_attention(q, k).sum(-2))  # (B, Hkv, n)
    assert kept_sets(kept.indices) == top_sets(column_sums[..., : N - 5], 13, 5)
    assert torch.allclose(kept.scores, column_sums.gather(2, kept.indices), atol=1e-5)


def test_h2o_sinks_are_always_kept(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("h2o", max_capacity_prompt=18, window_size=5, sink_size=3).compress_tokens(q, k, v)
    column_sums = group(naive_causal_attention(q, k).sum(-2))[..., 3 : N - 5]
    expected = [[{0, 1, 2} | {j + 3 for j in s} for s in row] for row in top_sets(column_sums, 10, 0, n=0)]
    expected = [[s | set(range(N - 5, N)) for s in row] for row in expected]
    assert kept_sets(kept.indices) == expected


def test_l2norm_keeps_lowest_norms_and_skips_layers(qkv) -> None:
    q, k, v = qkv
    method = methods.get("l2norm", max_capacity_prompt=12)
    kept = method.compress_tokens(q, k, v, layer_idx=2, num_layers=4)
    norms = k.norm(dim=-1)
    expected = [[set(norms[b, h].argsort()[:12].tolist()) for h in range(HKV)] for b in range(B)]
    assert kept_sets(kept.indices) == expected
    assert method.compress_tokens(q, k, v, layer_idx=1, num_layers=4).indices.shape[-1] == N


def test_random_is_seeded_and_keeps_the_window(qkv) -> None:
    q, k, v = qkv
    first = methods.get("random", max_capacity_prompt=20, seed=3).compress_tokens(q, k, v, layer_idx=1, num_layers=2)
    again = methods.get("random", max_capacity_prompt=20, seed=3).compress_tokens(q, k, v, layer_idx=1, num_layers=2)
    other = methods.get("random", max_capacity_prompt=20, seed=4).compress_tokens(q, k, v, layer_idx=1, num_layers=2)
    assert torch.equal(first.indices, again.indices) and not torch.equal(first.indices, other.indices)
    assert all(set(range(N - 8, N)) <= s and len(s) == 20 for row in kept_sets(first.indices) for s in row)


def cam_reference_values(q, k, v, window, start_ratio, seed, layer):
    """The CAM merge written as KVCache-Factory describes it: a loop over t with Bernoulli merges into the next W."""
    attention = group(naive_causal_attention(q, k)[..., -window:, :])  # (B, Hkv, W, n)
    mean_attention = attention.mean(-2)
    start = math.ceil(start_ratio * N)
    probabilities = torch.empty(B, HKV, N - window - start)
    for offset, m in enumerate(range(start, N - window)):
        reference = torch.maximum(mean_attention[..., :start].amax(-1), mean_attention[..., m : m + window].amax(-1))
        probabilities[..., offset] = (mean_attention[..., m] / reference).clamp(0, 1)
    draws = torch.bernoulli(probabilities, generator=torch.Generator().manual_seed(seed * 1_000_003 + layer))
    merged = v.clone()
    for offset, m in enumerate(range(start, N - window)):
        for b in range(B):
            for h in range(HKV):
                if draws[b, h, offset]:
                    merged[b, h, m + 1 : m + window + 1] += merged[b, h, m] / window
    return merged


def test_cam_keeps_unpooled_snapkv_tokens_and_merges_values(qkv) -> None:
    q, k, v = qkv
    original = v.clone()
    method = methods.get("cam", max_capacity_prompt=20, window_size=6, seed=5)
    kept = method.compress_tokens(q, k, v, layer_idx=1, num_layers=2)
    assert torch.equal(v, original), "CAM must not modify the caller's values"
    assert kept_sets(kept.indices) == top_sets(snapkv_reference(q, k, 6, 1, pooled=False), 14, 6)
    merged = cam_reference_values(q, k, v, 6, 0.1, 5, 1)
    expected = merged.gather(2, kept.indices[..., None].expand(-1, -1, -1, D))
    assert torch.allclose(kept.values, expected, atol=1e-5)
    assert not torch.allclose(kept.values, v.gather(2, kept.indices[..., None].expand(-1, -1, -1, D)))


def test_budget_at_or_above_prompt_evicts_nothing(qkv) -> None:
    q, k, v = qkv
    for name in methods.names():
        params = {} if name == "fullkv" else method_params(name, max_capacity_prompt=N)
        if name == "headkv":
            params["head_scores"] = synthetic_head_scores(layers=4)
        if name == "duo_attention":
            params["head_scores"] = [[0.1, 0.9]] * 4
        keys, values = methods.get(name, **params).compress(q, k, v, layer_idx=3, num_layers=4)
        if methods.get(name, **params).layout == "ragged":  # flat (N, d), head after head
            keys, values = keys.view(k.shape), values.view(v.shape)
        assert torch.equal(keys, k) and torch.equal(values, v), name


def test_ratio_budget(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("snapkv", max_capacity_prompt_ratio=0.5).compress_tokens(q, k, v)
    assert kept.indices.shape[-1] == 25


def test_h2o_column_sums_from_the_attention_kernels_lse(qkv) -> None:
    """H2O reuses the prefill kernel's log-sum-exp; the column sums equal the self-computed ones."""
    from kvfactory.attention import AttentionSpec, attend
    from kvfactory.methods.scoring import PrefillAttention, causal_column_sums

    q, k, v = qkv
    output, lse = attend(q, k, v, AttentionSpec("sdpa"), need_lse=True)
    assert lse is not None and lse.shape == (B, HQ, N)
    reference, _ = attend(q, k, v, AttentionSpec("eager"))
    assert (output - reference).abs().max() < 1e-5
    assert torch.allclose(causal_column_sums(q, k, PrefillAttention(lse=lse)), causal_column_sums(q, k), atol=1e-5)
    naive = naive_causal_attention(q, k).sum(-2).view(B, HKV, GROUPS, N)
    assert torch.allclose(causal_column_sums(q, k), naive, atol=1e-4)


def test_h2o_column_sums_from_the_eager_weights(qkv) -> None:
    """On the eager path H2O reads its column sums off the weights the layer computed; padded query rows, which
    attend everywhere, are left out of the sums."""
    from kvfactory.attention import AttentionSpec, attend
    from kvfactory.methods.scoring import PrefillAttention, causal_column_sums

    q, k, v = qkv
    _, weights = attend(q, k, v, AttentionSpec("eager"), need_lse=True)
    prefill = PrefillAttention.from_kernel(weights)
    naive = naive_causal_attention(q, k).sum(-2).view(B, HKV, GROUPS, N)
    assert prefill.lse is None and torch.allclose(causal_column_sums(q, k, prefill), naive, atol=1e-5)
    query_valid = torch.ones(B, N, dtype=torch.bool)
    query_valid[0, :3] = False
    sums = PrefillAttention.from_kernel(weights, query_valid).column_sums
    expected = (weights * query_valid[:, None, None, :, None]).sum(dim=3).flatten(1, 2)
    assert torch.allclose(sums, expected) and not torch.allclose(sums[0], prefill.column_sums[0])


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt-neox"])
def test_h2o_eager_and_sdpa_keep_the_same_tokens(arch: str) -> None:
    """H2O runs on both tested attention paths (eager reuses the weights, sdpa the kernel's lse) with one result,
    padded batch and decode-time budget included."""
    import kvfactory
    from tests.conftest import tiny_model

    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :7] = 0
    kept, generated = {}, {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model(arch, implementation)
        with kvfactory.patch(model, "h2o", max_capacity_prompt=16, window_size=4, decode_budget=20):
            out = model(ids, attention_mask=attention_mask, use_cache=True)
            kept[implementation] = [out.past_key_values.kept_positions(layer) for layer in range(2)]
            generated[implementation] = model.generate(ids, attention_mask=attention_mask, max_new_tokens=6,
                                                       do_sample=False, pad_token_id=0)
    assert all(torch.equal(a, b) for a, b in zip(kept["eager"], kept["sdpa"]))
    assert torch.equal(generated["eager"], generated["sdpa"])


def test_h2o_column_sums_by_the_cpu_kernel_equal_the_chunked_ones(qkv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of computing H2O's column sums and log-sum-exps (the CPU flash kernel, query chunks elsewhere)
    agree with the naive softmax."""
    from kvfactory.methods import scoring

    q, k, _ = qkv
    lse = scoring.causal_logsumexp(q, k)
    naive = naive_causal_attention(q, k).sum(-2).view(B, HKV, GROUPS, N)
    assert torch.allclose(scoring._column_sums_by_cpu_flash(q, k, lse), naive, atol=1e-4)
    monkeypatch.setattr(scoring, "_CPU_FLASH", None)
    assert torch.allclose(scoring.causal_logsumexp(q, k), lse, atol=1e-5)
    assert torch.allclose(scoring.causal_column_sums(q, k, scoring.PrefillAttention(lse=lse)), naive, atol=1e-4)
