"""HeadKV's head-importance file computed for any model, and query-agnostic reuse of a compressed context."""
from __future__ import annotations

import json

import pytest

import torch

import kvfactory
from kvfactory.generation import answer_on_compressed_context
from kvfactory.retrieval_heads import needle_span, retrieval_head_scores
from tests.conftest import random_prompt, tiny_model


class CharTokenizer:
    """One token per character (ids 3..122), enough for the passkey prompts of a 128-token tiny model."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None

    class _Encoded:
        def __init__(self, ids: list[int]) -> None:
            self.input_ids = ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> "CharTokenizer._Encoded":
        return self._Encoded([ord(c) % 120 + 3 for c in text])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3) if 32 <= i - 3 < 127 else "?" for i in ids)


def test_needle_span_finds_the_last_occurrence() -> None:
    assert needle_span([1, 2, 3, 9, 2, 3, 4], [2, 3]) == range(4, 6)


def test_retrieval_head_file_drives_headkv(tmp_path) -> None:
    model = tiny_model("llama")
    scores = retrieval_head_scores(model, CharTokenizer(), num_samples=2, length=300, max_new_tokens=4)
    assert set(scores) == {f"{layer}-{head}" for layer in range(2) for head in range(4)}
    assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for values in scores.values())
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(scores))
    with kvfactory.patch(model, "headkv", max_capacity_prompt=24, head_path=str(path)) as handle, torch.no_grad():
        cache = model(random_prompt(60), use_cache=True).past_key_values
    assert handle.method.head_scores == scores and len(cache) == 2
    assert _kept_per_head(cache) == _headkv_budgets(scores, capacity=24, window=8)
    # distinct scores (the tiny model's may all be equal): each KV head's budget follows its query heads' means
    spread = {f"{layer}-{head}": [float(layer * 4 + head + 1)] for layer in range(2) for head in range(4)}
    path.write_text(json.dumps(spread))
    with kvfactory.patch(model, "headkv", max_capacity_prompt=24, head_path=str(path)), torch.no_grad():
        cache = model(random_prompt(60), use_cache=True).past_key_values
    kept = _kept_per_head(cache)
    assert kept == _headkv_budgets(spread, capacity=24, window=8)
    flat = [count for layer in kept for count in layer]
    assert flat == sorted(flat) and flat[0] < flat[-1]  # the scores grow with (layer, head): so do the budgets


def _kept_per_head(cache) -> list[list[int]]:
    """Tokens each KV head of each layer kept at the prompt, ``[layer][kv head]`` (batch of one)."""
    return [[len(set(head.tolist()) - {-1}) for head in cache.kept_positions(layer)[0]] for layer in range(len(cache))]


def _headkv_budgets(scores: dict[str, list[float]], capacity: int, window: int, layers: int = 2, query_heads: int = 4,
                    kv_heads: int = 2, beta: float = 1.01) -> list[list[int]]:
    """KVCache-Factory's HeadKV caps computed here from the file, independently of kvfactory: per query head
    ``round(p · (P // beta) · L · Hq + P − P // beta)`` with ``p`` its mean score's share (equal shares when every
    score is 0) and ``P = C − W``; a KV head keeps the rounded mean of its group's caps plus the window."""
    means = {key: sum(values) / len(values) for key, values in scores.items()}
    total = sum(means.values())
    if total == 0:  # no head ever retrieved: equal shares
        means, total = {key: 1.0 for key in means}, float(len(means))
    past = capacity - window
    pooled = int(past // beta)
    groups = query_heads // kv_heads
    budgets = []
    for layer in range(layers):
        caps = [round(means[f"{layer}-{head}"] / total * pooled * layers * query_heads + past - pooled)
                for head in range(query_heads)]
        budgets.append([round(sum(caps[h * groups:(h + 1) * groups]) / groups) + window for h in range(kv_heads)])
    return budgets


def test_query_agnostic_answers_equal_fresh_compression() -> None:
    """Answering several questions on one compressed context (rolled back between questions) gives the same answers
    as compressing the context afresh for each question alone."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    context = random_prompt(60, seed=8)[0].tolist()
    questions = [random_prompt(6, seed=s)[0].tolist() for s in (1, 2, 3)]
    for name, params in [("snapkv", {"max_capacity_prompt": 20}), ("streamingllm", {"max_capacity_prompt": 20}),
                         ("adakv", {"max_capacity_prompt": 20}), ("h2o", {"max_capacity_prompt": 20})]:
        with kvfactory.patch(model, name, **params) as handle:
            together = answer_on_compressed_context(model, CharTokenizer(), handle, context, questions,
                                                    max_new_tokens=6)
            alone = [answer_on_compressed_context(model, CharTokenizer(), handle, context, [q], max_new_tokens=6)[0]
                     for q in questions]
        assert [a.new_token_ids for a in together] == [b.new_token_ids for b in alone], name
        assert all(a.kept_tokens <= 20.5 for a in together)


def test_query_agnostic_differs_from_query_aware_for_snapkv() -> None:
    """SnapKV scores the context with the question when the question is in the prompt (query-aware); the
    query-agnostic protocol compresses the context alone, so a different set of context tokens survives."""
    model = tiny_model("llama")
    context = random_prompt(60, seed=8)[0].tolist()
    question = random_prompt(8, seed=4)[0].tolist()
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=12, window_size=4), torch.no_grad():
        agnostic = model(torch.tensor([context]), use_cache=True).past_key_values
        aware = model(torch.tensor([context + question]), use_cache=True).past_key_values
    agnostic_context = set(agnostic.kept_positions(1).flatten().tolist())
    aware_context = {p for p in aware.kept_positions(1).flatten().tolist() if p < len(context)}
    assert agnostic_context != aware_context


def test_rollback_is_refused_after_a_decode_time_recompression() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16, decode_budget=18) as handle, torch.no_grad():
        cache = handle.new_cache()
        output = model(random_prompt(40), past_key_values=cache, use_cache=True)
        mark = cache.mark()
        for _ in range(4):  # the third step reaches the budget and compacts the store in place
            output = model(output.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="re-compressed after mark"):
        cache.rollback(mark)


@pytest.mark.parametrize("name", ["snapkv", "adakv", "h2o"])
def test_beam_search_reorders_the_cache(name: str) -> None:
    model = tiny_model("llama")
    ids = random_prompt(40)
    with kvfactory.patch(model, name, max_capacity_prompt=16) as handle, torch.no_grad():
        output = model.generate(ids, num_beams=3, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                                length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
        assert output.sequences.shape == (1, 45)
        # The winning beam re-scored alone, token by token on its own compressed cache: a cache row that followed
        # another beam (a wrong reorder) would give other log-probabilities than beam search summed.
        cache = handle.new_cache()
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        total = 0.0
        for token in output.sequences[0, 40:]:
            total += torch.log_softmax(logits.float(), -1)[0, token].item()
            logits = model(token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
    assert output.sequences_scores.item() == pytest.approx(total, abs=1e-3)


def test_fullkv_beam_search_equals_unpatched_beam_search() -> None:
    model = tiny_model("llama")
    ids = random_prompt(40)
    settings = dict(num_beams=3, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        with kvfactory.patch(model, "fullkv"):
            patched = model.generate(ids, **settings)
    assert torch.equal(plain, patched)
