"""Head-wise budgets in real ragged storage: exact attention, AdaKV/HeadKV selections, bytes, batches."""
from __future__ import annotations

import math

import pytest
import torch

import kvfactory
from kvfactory import methods
from kvfactory.attention import AttentionSpec, attend
from kvfactory.storage.ragged import RaggedStore
from tests.conftest import greedy, method_params, random_prompt, tiny_model
from tests.test_methods_kept import GROUPS, HKV, HQ, N, group, maxpool_loop, naive_causal_attention


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return (torch.randn(2, HQ, N, 16, generator=generator), torch.randn(2, HKV, N, 16, generator=generator),
            torch.randn(2, HKV, N, 16, generator=generator))


@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("sliding_window", [None, 30])
def test_ragged_attention_equals_masked_dense_attention(new_tokens: int, sliding_window: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, n, tail = 2, 40, 5
    keys = torch.randn(batch, HKV, n + tail, 16, generator=generator)
    values = torch.randn(batch, HKV, n + tail, 16, generator=generator)
    positions = torch.arange(n + tail).expand(batch, HKV, -1)
    keep = torch.rand(batch, HKV, n, generator=generator) < 0.4
    keep[0, 1] = False  # a head that keeps no prefix token at all
    store = RaggedStore.from_mask(keys[:, :, :n], values[:, :, :n], positions[:, :, :n], keep)
    store.append(keys[:, :, n:], values[:, :, n:], torch.arange(n, n + tail).expand(batch, -1))
    queries = torch.randn(batch, HQ, new_tokens, 16, generator=generator)
    query_positions = torch.arange(n + tail - new_tokens, n + tail).expand(batch, -1)
    spec = AttentionSpec("eager", sliding_window)
    ragged, _ = store.attend(queries, spec, query_positions=query_positions)
    # reference: dense attention over all n + tail tokens, evicted ones masked, causal among the new tokens
    visible = torch.cat([keep, torch.ones(batch, HKV, tail, dtype=torch.bool)], dim=-1)
    logits = (queries.view(batch, HKV, GROUPS, new_tokens, 16) @ keys[:, :, None].transpose(-1, -2)) / 4.0
    allowed = visible[:, :, None, None, :] & (positions[0, 0][None, :] <= query_positions[0][:, None])
    if sliding_window is not None:
        allowed &= (query_positions[0][:, None] - positions[0, 0][None, :]) < sliding_window
    expected = (logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ values[:, :, None]).view_as(ragged)
    assert (ragged - expected).abs().max().item() < 1e-5


def padded_reference(store: RaggedStore, queries: torch.Tensor, query_positions: torch.Tensor,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Masked dense attention of the last ``n`` slots' queries over the store's padded view (no cached layout)."""
    keys, values, positions, valid = store.padded()
    batch, heads, total, dim = keys.shape
    n = queries.shape[2]
    logits = (queries.view(batch, heads, -1, n, dim) @ keys[:, :, None].transpose(-1, -2)) / math.sqrt(dim)
    allowed = valid[:, :, None, None, :] & (torch.arange(total) <= torch.arange(total - n, total)[:, None])
    if sliding_window is not None:
        allowed &= (query_positions[:, None, None, :, None] - positions[:, :, None, None, :]) < sliding_window
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ values[:, :, None]).view_as(queries)


@pytest.mark.parametrize("sliding_window", [None, 30])
def test_ragged_layout_follows_reorder(sliding_window: int | None) -> None:
    """A batch whose samples keep different totals, attended, reordered (the tail is folded into a new prefix),
    then decoded further: attention always equals the padded view's, so the cached layout never goes stale."""
    generator = torch.Generator().manual_seed(3)
    batch, n = 3, 40
    keys, values = (torch.randn(batch, HKV, n, 16, generator=generator) for _ in range(2))
    keep = torch.rand(batch, HKV, n, generator=generator) < torch.tensor([0.2, 0.5, 0.8])[:, None, None]
    store = RaggedStore.from_mask(keys, values, torch.arange(n).expand(batch, HKV, -1), keep)
    spec = AttentionSpec("eager", sliding_window)
    for step, order in enumerate([None, torch.tensor([2, 0, 0]), None]):
        if order is not None:
            store.reorder(order)
            assert store.tail_length == 0 and store.layout.prefix_slots == int(store.lengths.sum(-1).max())
        position = torch.full((batch, 1), n + step)
        store.append(torch.randn(batch, HKV, 1, 16, generator=generator),
                     torch.randn(batch, HKV, 1, 16, generator=generator), position)
        queries = torch.randn(batch, HQ, 1, 16, generator=generator)
        ragged, _ = store.attend(queries, spec, query_positions=position)
        assert (ragged - padded_reference(store, queries, position, sliding_window)).abs().max().item() < 1e-5


def test_ragged_layout_follows_decode_time_compression() -> None:
    """AdaKV with a decode budget re-compresses while generating: every store it leaves has a layout derived from
    its own lengths, and attends like its padded view."""
    model = tiny_model("llama")
    with kvfactory.patch(model, "adakv", max_capacity_prompt=20, decode_budget=24) as handle:
        greedy(model, random_prompt(40, batch=2), 12)
    cache = handle.last_cache
    assert all(count > 0 for count in cache.compressions)
    generator = torch.Generator().manual_seed(5)
    for store in cache.stores:
        fresh = RaggedStore.from_mask(*store.padded())
        assert store.tail_length == 0 and torch.equal(store.layout.allowed, fresh.layout.allowed)
        assert torch.equal(store.layout.index, fresh.layout.index)
        position = torch.full((2, 1), cache.get_seq_length())
        store.append(torch.randn(2, HKV, 1, 16, generator=generator), torch.randn(2, HKV, 1, 16, generator=generator),
                     position)
        queries = torch.randn(2, HQ, 1, 16, generator=generator)
        ragged, _ = store.attend(queries, AttentionSpec("sdpa"), query_positions=position)
        assert (ragged - padded_reference(store, queries, position)).abs().max().item() < 1e-5


def test_ragged_attention_over_rows_longer_than_a_kernel_block() -> None:
    """Rows of thousands of slots where one head's tokens all lie in the row's first block and the other's in later
    blocks (the fused kernel then meets blocks its query rows see nothing of), at one and several new tokens."""
    generator = torch.Generator().manual_seed(6)
    n = 3000
    keys, values = (torch.randn(1, HKV, n, 16, generator=generator) for _ in range(2))
    keep = torch.zeros(1, HKV, n, dtype=torch.bool)
    keep[0, 0, torch.randperm(n, generator=generator)[:5]] = True
    keep[0, 1, 1000:] = True
    store = RaggedStore.from_mask(keys, values, torch.arange(n).expand(1, HKV, -1), keep)
    for new_tokens in (1, 4):
        position = torch.arange(n, n + new_tokens)[None] + store.tail_length
        store.append(torch.randn(1, HKV, new_tokens, 16, generator=generator),
                     torch.randn(1, HKV, new_tokens, 16, generator=generator), position)
        queries = torch.randn(1, HQ, new_tokens, 16, generator=generator)
        ragged, _ = store.attend(queries, AttentionSpec("sdpa"), query_positions=position)
        assert (ragged - padded_reference(store, queries, position)).abs().max().item() < 1e-5


@pytest.mark.parametrize("sliding_window", [None, 30])
def test_ragged_tail_grows_truncates_and_masks_invalid_tokens(sliding_window: int | None) -> None:
    """Decoding past several re-allocations of the tail, then a rollback (truncate) and appends over the dropped
    slots, some of them padding: attention always equals the padded view's, padding tokens are neither seen nor
    counted, and the buffers hold the prefix plus the tail's capacity, no padding to the longest head."""
    generator = torch.Generator().manual_seed(8)
    batch, n = 2, 40
    keys, values = (torch.randn(batch, HKV, n, 16, generator=generator) for _ in range(2))
    keep = torch.rand(batch, HKV, n, generator=generator) < torch.tensor([0.3, 0.7])[:, None, None]
    store = RaggedStore.from_mask(keys, values, torch.arange(n).expand(batch, HKV, -1), keep)
    spec = AttentionSpec("sdpa", sliding_window)
    prefix = int(keep.sum())

    def step(new_tokens: int, valid: torch.Tensor | None = None) -> None:
        position = torch.arange(new_tokens)[None].expand(batch, -1) + n + store.tail_length
        store.append(torch.randn(batch, HKV, new_tokens, 16, generator=generator),
                     torch.randn(batch, HKV, new_tokens, 16, generator=generator), position, valid)
        queries = torch.randn(batch, HQ, new_tokens, 16, generator=generator)
        ragged, _ = store.attend(queries, spec, query_positions=position, query_valid=valid)
        expected = padded_reference(store, queries, position, sliding_window)
        real = slice(None) if valid is None else valid[:, None, :, None].expand_as(ragged)
        assert (ragged - expected)[real].abs().max().item() < 1e-5 and torch.isfinite(ragged).all()

    for _ in range(30):
        step(1)
    assert store.layout.tail_capacity >= 30 and store._keys.shape[0] == prefix + batch * HKV * store.layout.tail_capacity
    store.truncate(store.length - 4)
    step(3, torch.tensor([[True, True, True], [False, True, True]]))
    assert store.kept_per_sample() == [float(keep[b].sum(-1).float().mean()) + 29 - b for b in range(batch)]
    for _ in range(12):
        step(1)
    assert not store.padded()[3][1, :, store.length - 15].any()


def test_ragged_cache_bytes_count_the_tail_and_its_headroom() -> None:
    """After decoding, the bytes are the prefix's plus the tail's allocation (keys, values, positions, layout)."""
    model = tiny_model("llama")
    with kvfactory.patch(model, "adakv", max_capacity_prompt=20) as handle:
        greedy(model, random_prompt(60), 6)
    total = 0
    for store in handle.last_cache.stores:
        tokens, capacity = int(store.lengths.sum()), store.layout.tail_capacity
        assert store.tail_length == 5 and capacity - 5 <= max(8, store.length // 16)
        slots = tokens + capacity * HKV
        total += slots * 2 * 16 * 4 + tokens * 4 + 2 * 8 + capacity * 4 + HKV * slots
    assert kvfactory.cache_nbytes(handle.last_cache) == total


def adakv_reference(q, k, capacity, window=8, kernel=7, floor_ratio=0.2, normalize=True):
    """AdaKV written from KVCache-Factory's description with explicit loops."""
    scores = group(naive_causal_attention(q, k)[..., -window:, : N - window].mean(-2))
    scores = maxpool_loop(scores, kernel)
    budget, floor = capacity - window, int((capacity - window) * floor_ratio)
    result = []
    for b in range(q.shape[0]):
        ranked, order = scores[b].sort(dim=-1, descending=True)
        if normalize:
            ranked = ranked * (ranked[:, :budget].sum(-1, keepdim=True) / ranked.sum(-1, keepdim=True))
        winners = ranked.flatten().topk(HKV * budget).indices // (N - window)
        row = []
        for h in range(HKV):
            cap = round(float((winners == h).sum()) * (1 - floor_ratio) + floor)
            row.append(set(order[h, :cap].tolist()) | set(range(N - window, N)))
        result.append(row)
    return result


@pytest.mark.parametrize("normalize", [True, False])
def test_adakv_matches_reference_and_budget(qkv, normalize: bool) -> None:
    q, k, v = qkv
    method = methods.get("adakv", max_capacity_prompt=20, normalize=normalize)
    keep = method.select_mask(q, k, v)
    sets = [[set(keep[b, h].nonzero().flatten().tolist()) for h in range(HKV)] for b in range(2)]
    assert sets == adakv_reference(q, k, 20, normalize=normalize)
    counts = keep.sum(-1)
    assert (counts >= int(12 * 0.2) + 8).all(), "every head keeps at least its floor plus the window"
    assert (counts.sum(-1) - HKV * 20).abs().max() <= HKV, "the layer total is the layer budget (± one per head)"
    flat_keys, flat_values = method.compress(q, k, v)
    assert flat_keys.shape == (int(counts.sum()), 16)


def test_adakv_max_and_mean_aggregation_differ(qkv) -> None:
    q, k, v = qkv
    mean = methods.get("adakv", max_capacity_prompt=16).select_mask(q, k, v)
    peak = methods.get("adakv", max_capacity_prompt=16, gqa_score_agg="max").select_mask(q, k, v)
    assert not torch.equal(mean, peak)


def test_headkv_table_and_selection(qkv) -> None:
    q, k, v = qkv
    scores = {"0-0": [8.0], "0-1": [4.0], "0-2": [6.0], "0-3": [2.0], "1-0": [12.0], "1-1": [2.0],
              "1-2": [4.0], "1-3": [6.0]}
    method = methods.get("headkv", max_capacity_prompt=20, window_size=8, head_scores=scores)
    table = method.capacity_table(20, 2, 4, 2)
    share = torch.tensor([8, 4, 6, 2, 12, 2, 4, 6], dtype=torch.float64) / 44
    pooled = math.floor(12 / 1.01)
    query_caps = torch.round(share * pooled * 8 + (12 - pooled)).view(2, 2, 2)
    assert table.tolist() == torch.round(query_caps.mean(-1)).long().tolist()
    assert abs(float(query_caps.mean()) - 12) < 1, "caps average C - W past tokens per head: C with the window"
    keep = method.select_mask(q, k, v, layer_idx=1, num_layers=2)
    pooled_scores = maxpool_loop(group(naive_causal_attention(q, k)[..., -8:, : N - 8].mean(-2)), 7)
    for b in range(2):
        for h in range(HKV):
            order = pooled_scores[b, h].sort(descending=True).indices  # max-pooling plateaus: same tie order
            expected = set(order[: int(table[1, h])].tolist()) | set(range(N - 8, N))
            assert set(keep[b, h].nonzero().flatten().tolist()) == expected


def test_headkv_rejects_a_file_of_another_model(tmp_path) -> None:
    path = tmp_path / "heads.json"
    path.write_text('{"40-0": [0.5]}')
    method = methods.get("headkv", head_path=str(path))
    with pytest.raises(ValueError, match="belongs to another model"):
        method.capacity_table(128, 2, 4, 2)
    with pytest.raises(ValueError, match="exactly one of head_path"):
        methods.get("headkv")


def test_ragged_cache_bytes_are_the_ragged_total() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "adakv", max_capacity_prompt=20), torch.no_grad():
        cache = model(random_prompt(60), use_cache=True).past_key_values
    total = 0
    for store in cache.stores:
        tokens = int(store.lengths.sum())
        assert tokens == store.flat_keys.shape[0] and abs(tokens - 2 * 20) <= 2
        # K and V (16 fp32 dims) and an int32 position per token, as dense storage; int64 lengths per head; the
        # cached layout: one bool per (head, token) of the sample
        total += tokens * (2 * 16 * 4 + 4) + 2 * 8 + 2 * tokens
    assert kvfactory.cache_nbytes(cache) == total


@pytest.mark.parametrize("name", ["fullkv", "snapkv", "adakv", "headkv", "h2o", "pyramidkv", "streamingllm"])
def test_batch_of_three_equals_single_runs(arch: str, name: str) -> None:
    model = tiny_model(arch)
    prompts = [random_prompt(length, seed=length)[0] for length in (40, 25, 33)]
    longest = max(len(p) for p in prompts)
    batch = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    params = {} if name == "fullkv" else method_params(name, max_capacity_prompt=20)
    with kvfactory.patch(model, name, **params):
        together = greedy(model, batch, 8, attention_mask=mask)
        alone = [greedy(model, prompt[None], 8)[0] for prompt in prompts]
    assert all(torch.equal(together[row], alone[row]) for row in range(3))


@pytest.mark.parametrize("name", ["adakv", "headkv", "ada-pyramidkv"])
def test_headwise_with_full_budget_generates_like_fullkv(name: str) -> None:
    model = tiny_model("mistral")
    ids = random_prompt(40, seed=4)
    expected = greedy(model, ids, 8)
    with kvfactory.patch(model, name, **method_params(name, max_capacity_prompt=40)):
        assert torch.equal(greedy(model, ids, 8), expected)


def test_dense_reference_for_attend_with_padding() -> None:
    """Padded query rows stay finite and real rows ignore padded keys."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=generator), torch.randn(2, 2, 6, 8, generator=generator),
               torch.randn(2, 2, 6, 8, generator=generator))
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    output, _ = attend(q, k, v, AttentionSpec("sdpa"), key_valid=valid, query_valid=valid)
    alone, _ = attend(q[1:, :, 2:], k[1:, :, 2:], v[1:, :, 2:], AttentionSpec("sdpa"))
    assert torch.isfinite(output).all() and (output[1:, :, 2:] - alone).abs().max() < 1e-6
