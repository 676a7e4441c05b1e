"""The predecessors' methods (docs/predecessors.md): which tokens each keeps, against naive references written here
(Python loops over tokens, partitions and channels), and kvpress's conventions for ``knorm`` and ``lagkv``.

The kvpress references are written from kvpress's documented algorithms as read in NVIDIA/kvpress
``kvpress/presses/knorm_press.py``, ``kvpress/presses/lagkv_press.py`` and ``kvpress/presses/scorer_press.py``
(score, then keep ``max(1, int(n · (1 − compression_ratio)))`` tokens by top-k); no code is copied."""
from __future__ import annotations

import math

import pytest
import torch

from kvfactory import methods

B, HKV, N, D = 2, 2, 61, 8
HQ = 4


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rand(B, HQ, N, D, seed=1), rand(B, HKV, N, D, seed=2), rand(B, HKV, N, D, seed=3)


def kept_sets(indices: torch.Tensor) -> list[list[set[int]]]:
    return [[set(indices[b, h].tolist()) for h in range(indices.shape[1])] for b in range(indices.shape[0])]


def per_head(rule) -> list[list[set[int]]]:
    return [[rule(b, h) for h in range(HKV)] for b in range(B)]


def best(values: list[float], count: int) -> set[int]:
    """Indices of the ``count`` largest values (ties: the earlier index), by sorting."""
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return set(order[:count])


# -- kvpress's presses ------------------------------------------------------------------------------------------------
def kvpress_kept_count(n: int, ratio: float) -> int:
    return max(1, int(n * (1 - ratio)))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_knorm_keeps_what_kvpress_knorm_press_keeps(qkv, ratio: float) -> None:
    q, k, v = qkv
    method = methods.get("knorm", compression_ratio=ratio)
    kept = method.compress_tokens(q, k, v, layer_idx=0, num_layers=4)  # kvpress compresses every layer, 0 included
    count = kvpress_kept_count(N, ratio)
    expected = per_head(lambda b, h: best([-math.sqrt(sum(x * x for x in k[b, h, j].tolist())) for j in range(N)],
                                          count))
    assert kept.indices.shape[-1] == count
    assert kept_sets(kept.indices) == expected


def test_knorm_budget_conventions() -> None:
    assert methods.get("knorm").compression_ratio == 0.5 and methods.get("knorm").capacity(3, 30, 1200) == 600
    assert methods.get("knorm", compression_ratio=0.1).capacity(3, 30, 1000) == 900  # kvpress: 0.1 removed
    assert methods.get("knorm", max_capacity_prompt_ratio=0.1).capacity(3, 30, 1000) == 100  # kvfactory: 0.1 kept
    assert methods.get("knorm", max_capacity_prompt=64).capacity(3, 30, 1000) == 64
    with pytest.raises(ValueError, match="not both"):
        methods.get("knorm", compression_ratio=0.3, max_capacity_prompt=64)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        methods.get("knorm", compression_ratio=1.0)


def lagkv_reference(keys: torch.Tensor, values: torch.Tensor, sinks: int, lag: int) -> torch.Tensor:
    """LagKV's scores (B, H, n) with loops: per partition, per channel min/max of the next partition, unbiased std
    over channels, softmax within the partition, key and value averaged, rank / lag; sinks and tail score 1."""
    batch, heads, n, dim = keys.shape
    scores = torch.ones(batch, heads, n)
    if n < sinks + 2 * lag:
        for j in range(sinks, n):
            scores[:, :, j] = (j - sinks) / (n - sinks)
        return scores
    partitions = (n - sinks) // lag
    for b in range(batch):
        for h in range(heads):
            for p in range(partitions - 1):
                start, nxt = sinks + p * lag, sinks + (p + 1) * lag
                both = []
                for states in (keys, values):
                    spreads = []
                    for j in range(start, start + lag):
                        normalized = []
                        for c in range(dim):
                            column = [states[b, h, t, c].item() for t in range(nxt, nxt + lag)]
                            normalized.append((states[b, h, j, c].item() - min(column)) / (max(column) - min(column)))
                        mean = sum(normalized) / dim
                        spreads.append(math.sqrt(sum((x - mean) ** 2 for x in normalized) / (dim - 1)))
                    total = sum(math.exp(s) for s in spreads)
                    both.append([math.exp(s) / total for s in spreads])
                averaged = [(a + c) / 2 for a, c in zip(*both)]
                order = sorted(range(lag), key=lambda i: averaged[i])
                for rank, i in enumerate(order):
                    scores[b, h, start + i] = rank / lag
    return scores


@pytest.mark.parametrize("n, ratio", [(47, 0.33), (47, 0.5), (20, 0.4)])
def test_lagkv_keeps_what_kvpress_lagkv_press_keeps(n: int, ratio: float) -> None:
    """n = 4 sinks + 5 partitions of 8 + 3: partitions 0-3 are scored, the tail (8 + 3) and the sinks kept. At 0.33,
    int(47 · 0.67) = 31 = 4 + 11 + 4 per scored partition (no ties); at 0.5, 23 = 15 + 8 (ties between partitions of
    equal rank: compared as a multiset of ranks). n = 20 < 4 + 2 · 8: the recency fallback."""
    keys, values = rand(B, HKV, n, D, seed=5), rand(B, HKV, n, D, seed=6)
    method = methods.get("lagkv", compression_ratio=ratio, n_sink=4, lag_size=8)
    kept = method.compress_tokens(keys, keys, values)
    reference = lagkv_reference(keys, values, 4, 8)
    assert torch.allclose(method.scores(keys, values), reference, atol=1e-6)
    count = kvpress_kept_count(n, ratio)
    assert kept.indices.shape[-1] == count
    for b in range(B):
        for h in range(HKV):
            threshold = sorted(reference[b, h].tolist(), reverse=True)[count - 1]
            chosen = kept.indices[b, h].tolist()
            assert all(reference[b, h, j] >= threshold for j in chosen)
            assert set(range(4)) <= set(chosen) and set(range(n - 11 if n == 47 else n - 1, n)) <= set(chosen)
            if n == 47 and ratio == 0.33:
                assert set(chosen) == best(reference[b, h].tolist(), count)


# -- the streaming project --------------------------------------------------------------------------------------------
SEPARATORS = [5, 17, 40, 77]


def separator_marks(ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return torch.tensor([[scale if t in SEPARATORS else 0.0 for t in row] for row in ids.tolist()])[:, None].expand(
        -1, HKV, -1)


@pytest.fixture
def token_ids() -> torch.Tensor:
    ids = torch.randint(0, 100, (B, N), generator=torch.Generator().manual_seed(9))
    ids[0, 10:30:3] = 5  # seven separators in sample 0's middle, few in sample 1's
    return ids


def test_sepllm_keeps_sinks_newest_separators_and_window(qkv, token_ids) -> None:
    q, k, v = qkv
    method = methods.get("sepllm", sink_size=3, window_size=10, separator_size=5, separator_ids=SEPARATORS)
    assert method.max_capacity_prompt == 18 and method.decode_budget == 18  # streams at C by default
    kept = method.compress_tokens(q, k, v, accumulated=separator_marks(token_ids))

    def rule(b: int, h: int) -> set[int]:
        middle = list(range(3, N - 10))
        separators = [j for j in reversed(middle) if token_ids[b, j].item() in SEPARATORS][:5]
        others = [j for j in reversed(middle) if j not in separators][: 5 - len(separators)]
        return set(range(3)) | set(separators) | set(others) | set(range(N - 10, N))

    assert kept_sets(kept.indices) == per_head(rule)
    with pytest.raises(ValueError, match="separator marks"):
        method.compress_tokens(q, k, v)


def h2o_column_sums(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ over queries of the causal softmax, averaged over each KV head's query group, with loops over queries."""
    groups = HQ // HKV
    sums = torch.zeros(B, HKV, N)
    for b in range(B):
        for head in range(HQ):
            for i in range(N):
                logits = torch.stack([q[b, head, i] @ k[b, head // groups, j] for j in range(i + 1)]) / math.sqrt(D)
                sums[b, head // groups, : i + 1] += logits.softmax(-1) / groups
    return sums


def test_unified_keeps_sinks_separators_heavy_hitters_and_window(qkv, token_ids) -> None:
    q, k, v = qkv
    method = methods.get("unified", sink_size=2, window_size=8, separator_size=3, heavy_size=6,
                         separator_ids=SEPARATORS, stream=False)
    assert method.max_capacity_prompt == 19
    kept = method.compress_tokens(q, k, v, accumulated=separator_marks(token_ids, 2.0**20))
    attention = h2o_column_sums(q, k)

    def rule(b: int, h: int) -> set[int]:
        middle = list(range(2, N - 8))
        separators = [j for j in reversed(middle) if token_ids[b, j].item() in SEPARATORS][:3]
        rest = [j for j in middle if j not in separators]
        heavy = best([attention[b, h, j].item() for j in rest], 19 - 2 - 8 - len(separators))
        return set(range(2)) | set(separators) | {rest[i] for i in heavy} | set(range(N - 8, N))

    assert kept_sets(kept.indices) == per_head(rule)


def test_lazy_h2o_is_h2o_with_a_streaming_budget(qkv) -> None:
    q, k, v = qkv
    lazy = methods.get("lazy_h2o", sink_size=2, window_size=8, heavy_size=10)
    assert (lazy.max_capacity_prompt, lazy.decode_budget, lazy.compress_interval) == (20, 20, 10)
    h2o = methods.get("h2o", sink_size=2, window_size=8, max_capacity_prompt=20)
    assert torch.equal(lazy.compress_tokens(q, k, v).indices, h2o.compress_tokens(q, k, v).indices)
    defaults = methods.get("lazy_h2o")
    assert (defaults.sink_size, defaults.window_size, defaults.heavy_size, defaults.max_capacity_prompt) == (4, 252, 128,
                                                                                                            384)


# -- kvcompress ---------------------------------------------------------------------------------------------------------
def norms_of(k: torch.Tensor, b: int, h: int) -> list[float]:
    return [math.sqrt(sum(x * x for x in k[b, h, j].tolist())) for j in range(k.shape[2])]


def test_recent_only_keeps_the_last_tokens(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("recent_only", max_capacity_prompt=12).compress_tokens(q, k, v)
    assert kept_sets(kept.indices) == per_head(lambda b, h: set(range(N - 12, N)))


def test_h2o_l2_keeps_sinks_lowest_norm_middle_and_recent(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("h2o_l2", max_capacity_prompt=20, sink_size=3, window_size=9).compress_tokens(q, k, v)

    def rule(b: int, h: int) -> set[int]:
        norms = norms_of(k, b, h)
        middle = best([-norms[j] for j in range(3, N - 9)], 8)
        return set(range(3)) | {j + 3 for j in middle} | set(range(N - 9, N))

    assert kept_sets(kept.indices) == per_head(rule)


def test_snapkv_lite_votes_with_pooled_inverted_norms(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("snapkv_lite", max_capacity_prompt=20, window_size=6, kernel_size=5).compress_tokens(q, k, v)

    for b in range(B):
        for h in range(HKV):
            inverted = [-x for x in norms_of(k, b, h)[: N - 6]]
            pooled = [max(inverted[max(0, j - 2) : j + 3]) for j in range(N - 6)]
            chosen = kept.indices[b, h].tolist()
            assert chosen[-6:] == list(range(N - 6, N))
            # max-pooling makes plateaus: compare the pooled votes kept (a multiset), not the tie-breaking
            assert sorted(pooled[j] for j in chosen[:-6]) == pytest.approx(sorted(pooled, reverse=True)[:14][::-1])


@pytest.mark.parametrize("strategy", ["keep_low", "keep_high"])
def test_fix_size_l2_protects_recent_and_chooses_by_norm(qkv, strategy: str) -> None:
    q, k, v = qkv
    method = methods.get("fix_size_l2", max_capacity_prompt=20, keep_ratio=0.25, strategy=strategy)
    kept = method.compress_tokens(q, k, v, layer_idx=2, num_layers=4)
    sign = -1 if strategy == "keep_low" else 1

    def rule(b: int, h: int) -> set[int]:
        return best([sign * x for x in norms_of(k, b, h)[: N - 5]], 15) | set(range(N - 5, N))

    assert kept_sets(kept.indices) == per_head(rule)
    assert method.compress_tokens(q, k, v, layer_idx=1, num_layers=4).indices.shape[-1] == N  # skip_layers [0, 1]
    random = methods.get("fix_size_l2", max_capacity_prompt=20, strategy="random").compress_tokens(q, k, v, layer_idx=3,
                                                                                                  num_layers=4)
    assert all(len(s) == 20 and set(range(N - 4, N)) <= s for row in kept_sets(random.indices) for s in row)


def test_adaptive_l2_schedule_and_lowest_norms(qkv) -> None:
    method = methods.get("adaptive_l2", max_capacity_prompt=512)
    assert method.capacity(0, 30, 500) == 500  # below soft_limit (= target): everything
    assert method.capacity(0, 30, 2000) == 512  # beyond hard_limit (= 2 · target): the target
    middle = [method.capacity(0, 30, n) for n in (600, 800, 1000)]
    assert all(512 <= c < n for c, n in zip(middle, (600, 800, 1000)))
    assert method.capacity(0, 30, 768) == round(768 * (1 - 0.5 * (1 - 512 / 1024)))  # halfway: a kept share of 0.75
    q, k, v = qkv
    small = methods.get("adaptive_l2", max_capacity_prompt=10, soft_limit=20, hard_limit=40)
    kept = small.compress_tokens(q, k, v)  # N = 61 > hard: 10 lowest norms
    assert kept_sets(kept.indices) == per_head(lambda b, h: best([-x for x in norms_of(k, b, h)], 10))


def test_every_predecessor_name_is_accepted_everywhere() -> None:
    names = ["sepllm", "unified", "lazy_unified", "lazy_h2o", "lagkv", "knorm", "fix_size_l2", "h2o_l2",
             "snapkv_lite", "adaptive_l2", "recent_only"]
    assert set(names) <= set(methods.names())
    from kvfactory.benchmarks.common import add_method_arguments, patch_parameters
    import argparse

    for name in names:
        parser = argparse.ArgumentParser()
        add_method_arguments(parser)
        args = parser.parse_args(["--method", name])
        assert patch_parameters(args)[0] == name


# -- kvcompress's prune_after (l2_compress's option: compress only beyond N tokens) ---------------------------------------
def naive_l2_compress(k: torch.Tensor, b: int, h: int, keep_ratio: float, prune_after: int) -> set[int]:
    """kvcompress's ``l2_compress`` on one head, as ../shared/specs/predecessors.md §B describes it: a sequence of at most
    ``prune_after`` tokens is left alone; a longer one keeps its ``ceil(keep_ratio · n)`` lowest key norms."""
    n = k.shape[2]
    if n <= prune_after:
        return set(range(n))
    norms = norms_of(k, b, h)
    return set(sorted(range(n), key=lambda j: (norms[j], j))[: math.ceil(keep_ratio * n)])


@pytest.mark.parametrize("prune_after", [0, 59, 60, 100])
def test_prune_after_keeps_short_sequences_whole_as_kvcompress_l2_compress(qkv, prune_after: int) -> None:
    q, k, v = (t[..., :60, :] for t in qkv)  # 60 tokens: ceil(0.25 · 60) = round(0.25 · 60) = 15
    method = methods.get("l2norm", max_capacity_prompt_ratio=0.25, prune_after=prune_after, skip_layers=[])
    kept = method.compress_tokens(q, k, v, layer_idx=0, num_layers=4)
    assert kept_sets(kept.indices) == per_head(lambda b, h: naive_l2_compress(k, b, h, 0.25, prune_after))
    assert kept.indices.shape[-1] == (60 if prune_after >= 60 else 15)
    assert method.describe()["prune_after"] == prune_after
    # skip_layers still apply beyond prune_after (l2_compress's other option)
    skipping = methods.get("l2norm", max_capacity_prompt_ratio=0.25, prune_after=prune_after, skip_layers=[1])
    assert skipping.compress_tokens(q, k, v, layer_idx=1, num_layers=4).indices.shape[-1] == 60


def test_prune_after_composes_and_holds_while_decoding() -> None:
    """Any method takes ``prune_after`` (a wrapper), also through ``--method_kwargs``; with a decode budget the cache
    grows untouched up to ``prune_after`` tokens, then is held at the budget."""
    from tests.conftest import greedy, random_prompt, tiny_model

    assert "prune_after" in methods.COMPOSITION_PARAMETERS
    assert methods.get("snapkv", max_capacity_prompt=16, prune_after=64).capacity(0, 2, 64) == 64
    assert methods.get("snapkv", max_capacity_prompt=16, prune_after=64).capacity(0, 2, 65) == 16
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="prune_after must be a non-negative integer"):
            methods.get("l2norm", prune_after=bad)
    import kvfactory

    model = tiny_model("llama")
    params = dict(max_capacity_prompt=16, decode_budget=16, skip_layers=[])
    kept = {}
    for prune_after, new_tokens in ((None, 8), (30, 8), (30, 20)):
        extra = {} if prune_after is None else {"prune_after": prune_after}
        with kvfactory.patch(model, "l2norm", **params, **extra) as handle:
            greedy(model, random_prompt(20), new_tokens)
            kept[prune_after, new_tokens] = handle.last_cache.mean_kept_tokens()
    assert kept[None, 8] == [16, 16]  # no prune_after: the 20-token prompt is cut to 16, and held there
    assert kept[30, 8] == [27, 27]  # 20 + 7 fed tokens <= 30: nothing evicted
    assert kept[30, 20] == [16, 16]  # beyond 30 tokens: held at the decode budget
