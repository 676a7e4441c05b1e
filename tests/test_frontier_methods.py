"""The methods of issue 17 (TOVA, Expected Attention, DuoAttention, CriticalKV, KeyDiff, ThinK, Quest, ChunkKV,
SimLayerKV): what each keeps, checked on random tensors against references written here.

Two kinds of reference: a naive one (explicit loops, ``repeat_kv`` by hand, full attention) and, for the methods
kvpress also has, a re-implementation of kvpress's documented algorithm at kvpress's own settings (a compression
ratio, its score conventions), written from these files of NVIDIA/kvpress (read, not copied):
``kvpress/presses/tova_press.py``, ``keydiff_press.py``, ``expected_attention_press.py``, ``criticalkv_press.py``,
``chunkkv_press.py``, ``simlayerkv_press.py``, ``kvzip_press.py``, ``duo_attention_press.py``, ``think_press.py`` and
``snapkv_press.py`` (``compute_window_attention``). kvpress masks or zeroes where kvfactory frees (docs/methods.md).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import kvfactory
from kvfactory import methods
from tests.conftest import method_params, tiny_model

B, HQ, HKV, N, D = 2, 4, 2, 60, 16
GROUPS = HQ // HKV
NEW = ["tova", "expected_attention", "kvzip", "duo_attention", "criticalkv", "keydiff", "think", "quest", "chunkkv",
       "simlayerkv"]


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return tuple(torch.randn(B, h, N, D, generator=generator) for h in (HQ, HKV, HKV))  # type: ignore[return-value]


def repeat_kv(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[:, h // GROUPS] for h in range(HQ)], dim=1)


def last_query_attention(q: torch.Tensor, k: torch.Tensor, queries: int = 1) -> torch.Tensor:
    """kvpress's ``compute_window_attention``: the last ``queries`` queries over every key, causal among themselves,
    fp32 softmax; ``(B, Hq, queries, n)`` (kvpress then drops the last ``queries`` columns)."""
    logits = q[..., -queries:, :] @ repeat_kv(k).transpose(-1, -2) / math.sqrt(D)
    n = k.shape[-2]
    for i in range(queries):
        logits[..., i, n - queries + i + 1 :] = float("-inf")
    return logits.softmax(-1)


def kept_sets(indices: torch.Tensor) -> list[list[set[int]]]:
    return [[set(indices[b, h].tolist()) for h in range(indices.shape[1])] for b in range(indices.shape[0])]


def kvpress_keep(scores: torch.Tensor, ratio: float) -> list[list[set[int]]]:
    """ScorerPress: keep the top ``int(n · (1 − ratio))`` scores of every (sample, KV head)."""
    kept = int(scores.shape[-1] * (1 - ratio))
    return kept_sets(scores.topk(kept, dim=-1).indices)


# ------------------------------------------------------------------------------------------------------------ TOVA
def test_tova_keeps_what_the_last_query_attends_to_averaged_over_every_head(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("tova", max_capacity_prompt=20, window_size=3).compress_tokens(q, k, v)
    attention = last_query_attention(q, k)[:, :, 0]  # (B, Hq, n)
    expected = []
    for b in range(B):
        mean = sum(attention[b, h] for h in range(HQ)) / HQ
        best = set(mean[: N - 3].topk(17).indices.tolist()) | {N - 3, N - 2, N - 1}
        expected.append([best] * HKV)
    assert kept_sets(kept.indices) == expected


def test_tova_equals_kvpress(qkv) -> None:
    q, k, v = qkv
    ratio = 0.5  # kvpress keeps int(60 · 0.5) = 30
    scores = last_query_attention(q, k)[:, :, 0, :-1].mean(1, keepdim=True).repeat(1, HKV, 1)
    scores = torch.cat([scores, scores.max().expand(B, HKV, 1)], dim=-1)  # the last token at the max score
    kept = methods.get("tova", max_capacity_prompt=30).compress_tokens(q, k, v)
    assert kept_sets(kept.indices) == kvpress_keep(scores, ratio)


# --------------------------------------------------------------------------------------------------------- KeyDiff
def test_keydiff_keeps_the_keys_least_similar_to_the_mean_normalized_key(qkv) -> None:
    q, k, v = qkv
    kept = methods.get("keydiff", max_capacity_prompt=25).compress_tokens(q, k, v)
    expected = []
    for b in range(B):
        row = []
        for h in range(HKV):
            anchor = sum(k[b, h, j] / k[b, h, j].norm() for j in range(N)) / N
            cosine = torch.tensor([float(k[b, h, j] @ anchor / (k[b, h, j].norm() * anchor.norm())) for j in range(N)])
            row.append(set((-cosine).topk(25).indices.tolist()))
        expected.append(row)
    assert kept_sets(kept.indices) == expected
    # kvpress (KeyDiffPress, ratio 0.6: 24 kept) scores the same way with no window
    anchor = torch.nn.functional.normalize(k, dim=-1).mean(2, keepdim=True)
    kvpress_scores = -torch.nn.functional.cosine_similarity(k, anchor, dim=-1)
    assert kept_sets(methods.get("keydiff", max_capacity_prompt=24).compress_tokens(q, k, v).indices) == \
        kvpress_keep(kvpress_scores, 0.6)


# ---------------------------------------------------------------------------------------------- Expected Attention
def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama RoPE written out: ``x cos + rotate_half(x) sin``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angles = positions.float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
    return x * cos + half * sin


def kvpress_expected_attention(hidden: torch.Tensor, wq: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               n_sink: int = 4, future: int = 512, epsilon: float = 0.0) -> torch.Tensor:
    """ExpectedAttentionPress.score: query mean/covariance from the hidden states after the sinks through ``Wq``,
    moved by the mean RoPE matrix ``cos·I + sin·P`` over the next ``future`` positions; softmax of
    ``μ·k/√d + kᵀΣk/(2d)`` over the non-sink keys, group mean, times ``‖v‖``; sinks padded with the max."""
    n = hidden.shape[1]
    h = hidden[:, n_sink:]
    mean_h = h.mean(1, keepdim=True)
    mu = (mean_h @ wq.T).squeeze(1).view(B, HQ, D)
    centered = h - mean_h
    cov_h = centered.transpose(1, 2) @ centered / h.shape[1]
    full = wq @ cov_h @ wq.T  # (B, Hq·D, Hq·D)
    cov = torch.stack([full[:, i * D : (i + 1) * D, i * D : (i + 1) * D] for i in range(HQ)], dim=1)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.arange(n, n + future).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    permutation = torch.zeros(D, D)
    permutation[D // 2 :, : D // 2], permutation[: D // 2, D // 2 :] = torch.eye(D // 2), -torch.eye(D // 2)
    rotation = (cos[:, :, None] * torch.eye(D) + sin[:, :, None] * permutation).mean(0)
    mu = mu @ rotation.T
    cov = rotation @ cov @ rotation.T
    keys = repeat_kv(k[:, :, n_sink:])
    logits = torch.einsum("bhd,bhnd->bhn", mu, keys) / math.sqrt(D)
    logits = logits + torch.einsum("bhnd,bhde,bhne->bhn", keys, cov, keys) / D / 2
    scores = logits.softmax(-1).view(B, HKV, GROUPS, -1).mean(2)
    scores = (scores + epsilon) * v[:, :, n_sink:].norm(dim=-1)
    return torch.cat([scores.max().expand(B, HKV, n_sink), scores], dim=-1)


def test_expected_attention_equals_kvpress_on_llama_rope() -> None:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, N, 24, generator=generator)
    wq = torch.randn(HQ * D, 24, generator=generator) / 5
    k = torch.randn(B, HKV, N, D, generator=generator)
    v = torch.randn(B, HKV, N, D, generator=generator)
    q_pre = (hidden @ wq.T).view(B, N, HQ, D).transpose(1, 2)
    q = rope(q_pre, torch.arange(N))  # the post-RoPE queries kvfactory sees
    method = methods.get("expected_attention", max_capacity_prompt=30)
    kept = method.compress_tokens(q, k, v)
    assert kept_sets(kept.indices) == kvpress_keep(kvpress_expected_attention(hidden, wq, k, v), 0.5)
    assert all({0, 1, 2, 3} <= s for row in kept_sets(kept.indices) for s in row)  # the sinks
    no_vnorm = methods.get("expected_attention", max_capacity_prompt=30, use_vnorm=False, use_covariance=False)
    assert not torch.equal(no_vnorm.compress_tokens(q, k, v).indices, kept.indices)


# ------------------------------------------------------------------------------------------------------ CriticalKV
def attach_output_projection(method, weight: torch.Tensor) -> None:
    method.attach(SimpleNamespace(attention_modules=[SimpleNamespace(o_proj=SimpleNamespace(weight=weight))],
                                  rotate=None))


def test_criticalkv_over_keydiff_equals_kvpress(qkv) -> None:
    q, k, v = qkv
    weight = torch.randn(32, HQ * D, generator=torch.Generator().manual_seed(5))
    method = methods.get("criticalkv", max_capacity_prompt=30, base="keydiff")
    attach_output_projection(method, weight)
    kept = method.compress_tokens(q, k, v)
    # CriticalKVPress over KeyDiffPress at ratio 0.5: stage 1 keeps int(0.5 · 60 · 0.5) = 15 by the raw scores,
    # stage 2 rescales by the L1 norm of W_o·v per query head (group mean)
    anchor = torch.nn.functional.normalize(k, dim=-1).mean(2, keepdim=True)
    scores = -torch.nn.functional.cosine_similarity(k, anchor, dim=-1)
    first = scores.topk(15, dim=-1).indices
    values = repeat_kv(v)
    norms = torch.stack([(values[:, h] @ weight[:, h * D : (h + 1) * D].T).abs().sum(-1) for h in range(HQ)], 1)
    weighted = (scores + 1e-4) * norms.view(B, HKV, GROUPS, N).mean(2)
    weighted.scatter_(-1, first, torch.finfo(weighted.dtype).max)
    assert kept_sets(kept.indices) == kvpress_keep(weighted, 0.5)
    plain = methods.get("keydiff", max_capacity_prompt=30).compress_tokens(q, k, v)
    assert kept_sets(plain.indices) != kept_sets(kept.indices)


def test_criticalkv_needs_the_model_and_keeps_the_scorers_window(qkv) -> None:
    q, k, v = qkv
    with pytest.raises(ValueError, match="output projections"):
        methods.get("criticalkv", max_capacity_prompt=30).compress_tokens(q, k, v)
    method = methods.get("criticalkv", max_capacity_prompt=20, base="snapkv", base_kwargs={"window_size": 6})
    attach_output_projection(method, torch.randn(32, HQ * D))
    assert method.window_size == 6
    assert all(set(range(N - 6, N)) <= s for row in kept_sets(method.compress_tokens(q, k, v).indices) for s in row)


# --------------------------------------------------------------------------------------------------------- ChunkKV
def kvpress_chunkkv(scores: torch.Tensor, ratio: float, chunk: int) -> list[set[int]]:
    """ChunkKVPress: chunk score = scores summed over heads, averaged over the chunk; keep the best
    ``max(1, int(chunks · (1 − ratio)))`` chunks whole (a shorter last chunk is one chunk)."""
    n = scores.shape[-1]
    complete, rest = divmod(n, chunk)
    result = []
    for b in range(scores.shape[0]):
        summed = scores[b].sum(0)
        chunk_scores = [float(summed[i * chunk : (i + 1) * chunk].mean()) for i in range(complete)]
        if rest:
            chunk_scores.append(float(summed[-rest:].mean()))
        kept = max(1, int(len(chunk_scores) * (1 - ratio)))
        best = torch.tensor(chunk_scores).topk(kept).indices.tolist()
        result.append({j for i in best for j in range(i * chunk, min(n, (i + 1) * chunk))})
    return result


@pytest.mark.parametrize("n", [60, 57])
def test_chunkkv_over_keydiff_equals_kvpress(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, h, n, D, generator=generator) for h in (HQ, HKV, HKV))
    capacity = n // 2 if n == 60 else 38  # 57 tokens: 3 chunks of 20 (one of 17) at ratio 1/3
    kept = methods.get("chunkkv", max_capacity_prompt=capacity, base="keydiff").compress_tokens(q, k, v)
    anchor = torch.nn.functional.normalize(k, dim=-1).mean(2, keepdim=True)
    scores = -torch.nn.functional.cosine_similarity(k, anchor, dim=-1)
    expected = kvpress_chunkkv(scores, 1 - capacity / n, 20)
    assert kept_sets(kept.indices) == [[s] * HKV for s in expected]


def test_chunkkv_keeps_whole_chunks_of_snapkv_scores_and_reuses_indices(qkv) -> None:
    q, k, v = qkv
    method = methods.get("chunkkv", max_capacity_prompt=30, chunk_length=10, reuse_layers=2)
    first = method.compress_tokens(q, k, v, layer_idx=0, num_layers=2)
    for row in kept_sets(first.indices):
        for kept in row:  # 3 whole chunks of 10 (C / n = 1/2 of 6 chunks), the same for both KV heads
            chunks = {j // 10 for j in kept}
            assert len(chunks) == 3 and kept == {j for c in chunks for j in range(c * 10, c * 10 + 10)}
        assert row[0] == row[1]
    generator = torch.Generator().manual_seed(1)
    other = tuple(torch.randn_like(t, dtype=torch.float32).normal_(generator=generator) for t in (q, k, v))
    reused = method.compress_tokens(*other, layer_idx=1, num_layers=2)
    assert torch.equal(reused.indices, first.indices)  # layer 1 reuses layer 0's chunks


# ------------------------------------------------------------------------------------------------------ SimLayerKV
def kvpress_simlayerkv(q, k, threshold: float, n_last: int, n_recent: int, n_initial: int) -> tuple[bool, list[int]]:
    """SimLayerKVPress: lazy when the last ``n_last`` queries' attention (mean over batch, heads, queries) on the
    first ``n_initial`` + last ``n_recent`` of the keys before the window exceeds the threshold; a lazy layer keeps
    ``keys[:n_initial]`` and ``keys[-n_recent + n_last:]``."""
    attention = last_query_attention(q, k, n_last)[..., : N - n_last].mean((0, 1, 2))
    share = float(attention[:n_initial].sum() + attention[-n_recent:].sum())
    kept = list(range(n_initial)) + list(range(N - n_recent + n_last, N))
    return share > threshold, kept


@pytest.mark.parametrize("n_last", [1, 3])
def test_simlayerkv_equals_kvpress(qkv, n_last: int) -> None:
    q, k, v = qkv
    capacity, n_initial = 24, 4
    n_recent = capacity - n_initial + n_last
    method = methods.get("simlayerkv", max_capacity_prompt=capacity, n_last=n_last, lazy_threshold=0.0)
    share = method.lazy_share(q, k, capacity)
    for threshold in (share - 1e-4, share + 1e-4):
        lazy, kept = kvpress_simlayerkv(q, k, threshold, n_last, n_recent, n_initial)
        method = methods.get("simlayerkv", max_capacity_prompt=capacity, n_last=n_last, lazy_threshold=threshold)
        result = method.compress_tokens(q, k, v)
        assert lazy == (threshold < share)
        expected = set(kept) if lazy else set(range(N))
        assert all(s == expected for row in kept_sets(result.indices) for s in row), threshold


# --------------------------------------------------------------------------------------------------- DuoAttention
def test_duo_attention_equals_kvpress_masking(qkv) -> None:
    q, k, v = qkv
    scores = [[0.9, 0.2], [0.1, 0.7], [0.5, 0.3]]  # (L=3, Hkv)
    method = methods.get("duo_attention", head_scores=scores, head_compression_ratio=0.5, sink_size=4,
                         recent_size=10)
    # kvpress: the round(6 · 0.5) = 3 lowest-scoring heads stream; their keys [sink : -recent] are masked
    order = sorted(range(6), key=lambda i: scores[i // 2][i % 2])[:3]
    for layer in range(3):
        masked = torch.zeros(B, HKV, N, dtype=torch.bool)
        for h in range(HKV):
            if layer * 2 + h in order:
                masked[:, h, 4 : N - 10] = True
        keep = method.select_mask(q, k, v, layer_idx=layer, num_layers=3)
        assert torch.equal(keep, ~masked), layer
    keys, _ = method.compress(q, k, v, layer_idx=1, num_layers=3)  # really freed: flat (N, d) of kept slots only
    assert keys.shape[0] == B * (N + 14)


def test_duo_attention_streaming_heads_hold_their_budget_while_decoding() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(2))
    with kvfactory.patch(model, "duo_attention", head_scores=[[0.1, 0.9], [0.2, 0.8]], sink_size=4, recent_size=8,
                         compress_interval=4) as handle, torch.no_grad():
        model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        cache = handle.last_cache
    for layer in range(2):
        lengths = cache.stores[layer].head_lengths()[0].tolist()
        assert lengths[1] == 79 and 12 <= lengths[0] < 12 + 4, lengths  # retrieval head: all; streaming: 12 + tail
    assert cache.nbytes() < 0.75 * 2 * 79 * 2 * 2 * 16 * 4


def test_duo_attention_patterns_from_a_file_or_estimated(tmp_path) -> None:
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t-0.2\n0.4\t1.5\n")
    method = methods.get("duo_attention", pattern_path=str(tmp_path / "full_attention_heads.tsv"))
    assert method.head_scores == [[0.9, 0.0], [0.4, 1.0]]  # clipped to [0, 1] as DuoAttention does
    assert method.streaming_mask().tolist() == [[False, True], [True, False]]
    import json

    heads = {f"{layer}-{head}": [0.1 * (layer * 4 + head)] for layer in range(2) for head in range(4)}
    (tmp_path / "heads.json").write_text(json.dumps(heads))  # kvfactory.retrieval_heads' format, query heads
    model = tiny_model("llama")
    with kvfactory.patch(model, "duo_attention", pattern_path=str(tmp_path / "heads.json")) as handle:
        assert torch.allclose(torch.tensor(handle.method.head_scores),  # query heads averaged per KV head
                              torch.tensor([[0.05, 0.25], [0.45, 0.65]]))
        assert handle.method.streaming_mask().tolist() == [[True, True], [False, False]]
    with kvfactory.patch(model, "duo_attention") as handle:
        assert len(handle.method.head_scores) == 2 and len(handle.method.head_scores[0]) == 2
    with pytest.raises(ValueError, match="another model"):
        kvfactory.patch(model, "duo_attention", head_scores=[[0.5, 0.5]] * 3)
    with pytest.raises(ValueError, match="needs head patterns"):
        methods.get("duo_attention").select_mask(*[torch.randn(1, 2, 8, 4)] * 3)


# ----------------------------------------------------------------------------------------------------------- ThinK
def test_think_prunes_the_channels_kvpress_scores(qkv) -> None:
    q, k, v = qkv
    method = methods.get("think", key_channel_compression_ratio=0.25, window_size=8)
    kept = method.compress_tokens(q, k, v)
    # ThinKPress: mean of q² over the last window per query head, group mean, times mean of k² over tokens;
    # the int(16 · 0.25) = 4 lowest channels are zeroed
    for b in range(B):
        for h in range(HKV):
            query_power = sum((q[b, g, -8:] ** 2).mean(0) for g in range(h * GROUPS, (h + 1) * GROUPS)) / GROUPS
            scores = query_power * (k[b, h] ** 2).mean(0)
            pruned = set(scores.argsort()[:4].tolist())
            zero = {c for c in range(D) if bool((kept.keys[b, h, :, c] == 0).all())}
            assert zero == pruned
            assert torch.equal(kept.keys[b, h][:, sorted(set(range(D)) - pruned)],
                               k[b, h][:, sorted(set(range(D)) - pruned)])
    assert torch.equal(kept.values, v)


def test_think_stores_only_the_kept_channels_and_attends_as_zeroed_keys() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(4))
    with kvfactory.patch(model, "think", key_channel_compression_ratio=0.5) as handle, torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        store = cache.stores[0]
        assert store.inner.keys.shape == (1, 2, 40, 8) and store.inner.values.shape == (1, 2, 40, 16)
        full_keys = store.keys
        assert int((full_keys == 0).all(dim=2).sum()) == 2 * 8  # 8 zero channels per head, seen zero-filled
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    per_token = 2 * (8 * 4 + 16 * 4) + 2 * 4  # pruned keys + values (fp32) + int32 positions, per head pair
    assert cache.nbytes() >= 2 * 41 * per_token and cache.nbytes() < 2 * 41 * (2 * 2 * 16 * 4 + 8)
    # the same step with the zeroed keys through ordinary attention: equal
    from kvfactory.attention import AttentionSpec, attend
    queries = torch.randn(1, 4, 1, 16)
    inner = store.inner
    expected, _ = attend(queries, store.keys, inner.values, AttentionSpec("eager"))
    got, _ = store.attend(queries, AttentionSpec("sdpa"))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.isfinite(step).all()


def test_think_composes_with_snapkv_scoring_on_pruned_keys(qkv) -> None:
    q, k, v = qkv
    method = methods.get("think", token_method="snapkv", max_capacity_prompt=20,
                         token_method_kwargs={"window_size": 4})
    kept = method.compress_tokens(q, k, v)
    channels, zeroed = method.prune(q, k)
    expected = methods.get("snapkv", max_capacity_prompt=20, window_size=4).compress_tokens(q, zeroed, v)
    assert torch.equal(kept.indices, expected.indices) and kept.indices.shape[-1] == 20
    assert not torch.equal(kept.indices, methods.get("snapkv", max_capacity_prompt=20, window_size=4)
                           .compress_tokens(q, k, v).indices)


# ----------------------------------------------------------------------------------------------------------- Quest
def test_quest_reads_the_top_pages_by_the_min_max_bound() -> None:
    from kvfactory.attention import AttentionSpec
    from kvfactory.storage.dense import StoreRow
    from kvfactory.storage.paged_read import PagedReadStorage

    generator = torch.Generator().manual_seed(8)
    total, page, budget = 70, 8, 24  # 9 pages, 3 read per query head
    keys, values = torch.randn(1, HKV, total, D, generator=generator), torch.randn(1, HKV, total, D, generator=generator)
    store = PagedReadStorage(budget, page, []).build(0, [StoreRow(keys, values, torch.arange(total).expand(1, HKV, total))])
    query = torch.randn(1, HQ, 1, D, generator=generator)
    output, _ = store.attend(query, AttentionSpec("sdpa"))
    read = 0
    for h in range(HQ):
        kv = h // GROUPS
        bounds = []
        for p in range(9):
            block = keys[0, kv, p * page : (p + 1) * page]
            bounds.append(sum(max(float(query[0, h, 0, c] * block[:, c].min()), float(query[0, h, 0, c] * block[:, c].max()))
                              for c in range(D)))
        bounds[-1] = float("inf")  # the newest page
        pages = sorted(range(9), key=lambda p: -bounds[p])[:3]
        slots = [j for p in pages for j in range(p * page, min(total, (p + 1) * page))]
        weights = (query[0, h, 0] @ keys[0, kv, slots].T / math.sqrt(D)).softmax(-1)
        assert torch.allclose(output[0, h, 0], weights @ values[0, kv, slots], atol=1e-5), h
    for kv in range(HKV):
        union = set()
        for h in range(kv * GROUPS, (kv + 1) * GROUPS):
            bounds = [sum(max(float(query[0, h, 0, c] * keys[0, kv, p * page : (p + 1) * page, c].min()),
                              float(query[0, h, 0, c] * keys[0, kv, p * page : (p + 1) * page, c].max()))
                          for c in range(D)) for p in range(9)]
            bounds[-1] = float("inf")
            union |= set(sorted(range(9), key=lambda p: -bounds[p])[:3])
        read += sum(min(total, (p + 1) * page) - p * page for p in union) * 2 * D * 4
    read += HKV * 9 * 2 * D * 4  # the min/max metadata
    assert store.last_read_bytes == read and store.full_read_bytes == total * HKV * 2 * D * 4


def test_quest_keeps_everything_and_reads_less_while_decoding() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 100), generator=torch.Generator().manual_seed(6))
    with kvfactory.patch(model, "quest", max_capacity_prompt=32, page_size=8, skip_layers=[0]) as handle:
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        cache = handle.last_cache
    assert cache.kept_tokens() == [104, 104]
    assert cache.stores[0].last_read_bytes == cache.stores[0].full_read_bytes  # a skipped layer reads all
    assert cache.stores[1].last_read_bytes < 0.7 * cache.stores[1].full_read_bytes
    with pytest.raises(ValueError, match="decode_budget"):
        methods.get("quest", decode_budget=64)


# ----------------------------------------------------------------------------------------------------------- KVzip
@pytest.mark.parametrize("layerwise", [False, True])
def test_kvzip_keeps_what_reconstruction_attends_to(layerwise: bool) -> None:
    """kvpress's KVzipPress on one chunk (no tokenizer: the repeat pass is the context itself): the score of context
    token j is the max over the repeat queries and the KV head's query group of their causal attention to j (the
    first 4 tokens score 1); the model keeps the top L · Hkv · C scores (``layerwise``: Hkv · C per layer). The
    reference reads the attention of one unpatched eager forward over context + repeat, which is what the scratch
    cache and the repeat pass compute."""
    model = tiny_model("llama", "eager")
    n, capacity = 40, 12
    ids = torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        attentions = model(torch.cat([ids, ids], dim=1), output_attentions=True).attentions
    scores = []
    for attention in attentions:  # (1, Hq, 2n, 2n)
        rows = attention[0, :, n:, :n]  # repeat queries over the context
        per_kv = torch.stack([rows[h * GROUPS : (h + 1) * GROUPS].amax(dim=(0, 1)) for h in range(HKV)])
        per_kv[:, :4] = 1.0
        scores.append(per_kv)
    scores = torch.stack(scores)  # (L, Hkv, n)
    if layerwise:
        expected = [[set(scores[l, h].topk(0).indices.tolist()) for h in range(HKV)] for l in range(2)]
        flat = scores.flatten(1).topk(HKV * capacity, dim=-1).indices
        expected = [[{int(i) % n for i in flat[l] if int(i) // n == h} for h in range(HKV)] for l in range(2)]
    else:
        flat = scores.flatten().topk(2 * HKV * capacity).indices.tolist()
        expected = [[{i % n for i in flat if i // n == l * HKV + h} for h in range(HKV)] for l in range(2)]
    with kvfactory.patch(model, "kvzip", max_capacity_prompt=capacity, layerwise=layerwise) as handle, \
            torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    got = [[{p for p in cache.kept_positions(l)[0, h].tolist() if p >= 0} for h in range(HKV)] for l in range(2)]
    assert got == expected
    assert sum(len(s) for row in got for s in row) == 2 * HKV * capacity  # the model-wide (or per-layer) budget
    with pytest.raises(ValueError, match="reconstructing"):
        methods.get("kvzip").select_mask(*[torch.randn(1, 2, 8, 4)] * 3)


def test_kvzip_compresses_its_scratch_prefill_instead_of_prefilling_twice() -> None:
    """One unpadded sample: the scratch prefill is the prefill (2 forwards instead of 3: scratch + repeat), with the
    same logits, kept tokens, bytes and generation as the three-forward path (forced by ``prefill_chunk_size``
    above the prompt length, which takes the general path without chunking)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 50), generator=torch.Generator().manual_seed(13))
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    runs = {}
    try:
        for name, extra in (("adopted", {}), ("three passes", {"prefill_chunk_size": 1000})):
            calls.clear()
            with kvfactory.patch(model, "kvzip", max_capacity_prompt=12, **extra) as handle, torch.no_grad():
                out = model(ids, use_cache=True)
                forwards = len(calls)
                generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
                runs[name] = (forwards, out.logits, out.past_key_values, generated, handle.last_cache.nbytes())
    finally:
        hook.remove()
    (forwards, logits, cache, generated, _), (forwards_3, logits_3, cache_3, generated_3, _) = runs.values()
    assert (forwards, forwards_3) == (2, 3)
    assert torch.equal(logits, logits_3) and torch.equal(generated, generated_3)
    for layer in range(2):
        assert torch.equal(cache.kept_positions(layer), cache_3.kept_positions(layer))
        assert all(torch.equal(a, b) for a, b in zip(cache[layer], cache_3[layer]))
    assert cache.get_seq_length() == 50 and cache.nbytes() == cache_3.nbytes() and runs["adopted"][4] == runs[
        "three passes"][4]


# ------------------------------------------------------------------------------------ every new method, end to end
@pytest.mark.parametrize("name", NEW)
def test_padded_batch_keeps_what_each_sample_keeps_alone(name: str) -> None:
    """A left-padded batch compresses each sample as if it ran alone (kept positions per layer), then decodes."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    params = method_params(name, max_capacity_prompt=32)
    if name == "simlayerkv":
        params["lazy_threshold"] = 0.0  # every layer lazy: something to compare
    if name == "think":
        params["key_channel_compression_ratio"] = 0.5
    with kvfactory.patch(model, name, **params) as handle, torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=True).past_key_values
        alone = model(ids[1:, 12:], use_cache=True).past_key_values
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
    assert generated.shape == (2, 74) and handle.last_cache.get_seq_length() == 73
    for layer in range(2):
        got, want = batch.kept_positions(layer)[1], alone.kept_positions(layer)[0]
        for h in range(HKV):
            assert sorted(p for p in got[h].tolist() if p >= 0) == [p + 12 for p in want[h].tolist() if p >= 0], \
                (name, layer)


@pytest.mark.parametrize("name", NEW)
def test_every_new_method_runs_in_the_runners(name: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_needle, run_ppl and run_speed accept each method by name with the usual budget flag (a tiny Llama with a
    word tokenizer; run_longbench, run_ruler and run_passkey: tests/test_frontier_runners.py)."""
    import run_needle
    import run_ppl
    import run_speed
    from kvfactory.benchmarks import common
    from kvfactory.benchmarks import needle_haystack
    from tests.test_needle import essays
    from tests.test_needle_protocol import PROMPT_WORDS, SENTENCE, WordTokenizer
    from tests.test_ppl import WordTokenizer as PplTokenizer

    budget = ["--max_capacity_prompts", "48"]
    monkeypatch.setattr(common, "load_model", lambda args: (tiny_model("llama"), WordTokenizer(
        SENTENCE, PROMPT_WORDS, needle_haystack.NOISE_SENTENCE, chat=True)))
    assert run_needle.main(["--model_path", "random:tiny-llama", "--context_lengths", "120", "--num_depths", "2",
                            "--haystack_dir", str(essays(tmp_path)), "--save_dir", str(tmp_path / "needle"),
                            "--max_new_tokens", "2", "--no_plot", "--method", name, *budget]) == 0
    assert any((tmp_path / "needle").rglob("*.json"))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(" ".join(f"w{(i * 7) % 60}" for i in range(90)))
    monkeypatch.setattr(common, "load_model", lambda args: (tiny_model("llama"), PplTokenizer()))
    assert run_ppl.main(["suffix", "--method", name, "--max_capacity_prompts", "16", "--max_length", "32",
                         "--max_windows", "1", "--data_dir", str(texts), "--output_dir", str(tmp_path / "ppl"),
                         "--model_path", "tiny"]) == 0
    assert run_speed.main(["--config", "tiny-llama", "--context_lengths", "40", "--new_tokens", "2", "--repeats", "1",
                           "--warmup", "0", "--output_dir", str(tmp_path / "speed"), "--methods",
                           f"{name}:max_capacity_prompt=16@x"]) == 0
