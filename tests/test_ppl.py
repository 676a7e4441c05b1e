"""Perplexity benchmarks: suffix PPL through a compressed cache, streaming PPL with bounded caches, data, grid outputs."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompt, tiny_model
from kvfactory.benchmarks import grid, ppl
from kvfactory.benchmarks.efficiency_plots import plot_budget_curves, plot_streaming
from kvfactory.benchmarks.speed import write_rows


def plain_ppl(model: torch.nn.Module, tokens: list[int], first_scored: int) -> float:
    """PPL of tokens[first_scored:] under one plain forward of the unpatched model."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].float()
    return math.exp(F.cross_entropy(logits[first_scored - 1 : -1], ids[0, first_scored:]).item())


def windows(count: int = 3, length: int = 48, seed: int = 0) -> list[list[int]]:
    return random_prompt(count * length, seed=seed)[0].view(count, length).tolist()


def test_fullkv_suffix_ppl_equals_plain_model(arch: str) -> None:
    model = tiny_model(arch)
    data = windows()
    result = ppl.suffix_ppl(model, data, prefix_ratio=0.5, progress=False)
    nll = sum(math.log(plain_ppl(model, w, 24)) * 24 for w in data)
    assert result.tokens == 3 * 24 and result.windows == 3
    assert result.ppl == pytest.approx(math.exp(nll / result.tokens), rel=1e-4)
    assert 0 <= result.accuracy <= 1


def test_suffix_chunk_equals_token_by_token_under_compression() -> None:
    model = tiny_model("llama")
    data = windows(2, 64)
    params = {"max_capacity_prompt_ratio": 0.5, "window_size": 4}
    whole = ppl.suffix_ppl(model, data, method="snapkv", params=params, progress=False)
    stepwise = ppl.suffix_ppl(model, data, method="snapkv", params=params, suffix_chunk=1, progress=False)
    full = ppl.suffix_ppl(model, data, progress=False)
    assert whole.kept_tokens == pytest.approx(16.0)  # half of the 32-token prefix, every layer
    assert whole.ppl == pytest.approx(stepwise.ppl, rel=1e-4)
    assert whole.ppl != pytest.approx(full.ppl, rel=1e-6)  # the compression did change the scores
    assert whole.cache_bytes < full.cache_bytes


def test_suffix_ppl_rejects_bad_prefix_ratio() -> None:
    with pytest.raises(ValueError, match="prefix_ratio"):
        ppl.suffix_ppl(tiny_model("llama"), windows(1), prefix_ratio=1.0, progress=False)


@pytest.mark.parametrize("method,params", [
    ("streamingllm", {"max_capacity_prompt": 200, "sink_size": 4, "decode_budget": 200}),
    ("h2o", {"max_capacity_prompt": 200, "sink_size": 4, "window_size": 8, "decode_budget": 200}),
])
def test_streaming_ppl_with_a_larger_cache_equals_fullkv(method: str, params: dict) -> None:
    model = tiny_model("llama")
    tokens = random_prompt(120, seed=1)[0].tolist()
    bounded = ppl.streaming_ppl(model, tokens, method=method, params=params, progress=False)
    full = ppl.streaming_ppl(model, tokens, progress=False)
    chunked_full = ppl.streaming_ppl(model, tokens, chunk_size=32, progress=False)
    assert bounded.tokens == full.tokens == len(tokens) - 1
    assert bounded.ppl == pytest.approx(full.ppl, rel=1e-4)
    assert chunked_full.ppl == pytest.approx(full.ppl, rel=1e-4)
    assert full.ppl == pytest.approx(plain_ppl(model, tokens, 1), rel=1e-4)
    assert len(full.step_seconds) == len(tokens) - 1


def test_streaming_cache_stays_bounded() -> None:
    model = tiny_model("llama")
    tokens = random_prompt(100, seed=2)[0].tolist()
    full = ppl.streaming_ppl(model, tokens, progress=False)
    for method, params in (("streamingllm", {"max_capacity_prompt": 16, "sink_size": 4, "decode_budget": 16}),
                           ("h2o", {"max_capacity_prompt": 20, "sink_size": 4, "window_size": 8, "decode_budget": 20})):
        bounded = ppl.streaming_ppl(model, tokens, method=method, params=params, progress=False)
        assert bounded.kept_tokens == params["decode_budget"]
        assert bounded.cache_bytes < full.cache_bytes / 3
        assert bounded.ppl != pytest.approx(full.ppl, rel=1e-6)


def test_chunked_baseline_scores_every_token_once() -> None:
    model = tiny_model("llama")
    tokens = random_prompt(70, seed=3)[0].tolist()
    chunked = ppl.chunked_ppl(model, tokens, 16, progress=False)
    assert chunked.tokens == len(tokens) - 1 and chunked.windows == math.ceil((len(tokens) - 1) / 16)
    whole = ppl.chunked_ppl(model, tokens, 1000, progress=False)
    assert whole.ppl == pytest.approx(plain_ppl(model, tokens, 1), rel=1e-4)
    assert chunked.ppl != pytest.approx(whole.ppl, rel=1e-6)


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace word (3 + its index in first-seen order); EOS is 2."""

    eos_token_id = 2

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}

    def __call__(self, texts: list[str], add_special_tokens: bool = False, verbose: bool = True) -> dict:
        ids = [[self.vocabulary.setdefault(word, 3 + len(self.vocabulary)) for word in text.split()] for text in texts]
        return {"input_ids": ids}


def test_text_files_stream_and_windows(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"three four\r\nfive\r\n")
    (tmp_path / "a.txt").write_text("one two")
    documents = ppl.load_documents("my_texts", tmp_path)
    assert documents == ["one two", "three four\nfive\n"]  # sorted, CRLF normalised
    stream = ppl.token_stream(WordTokenizer(), documents)
    assert stream == [3, 4, 2, 5, 6, 7, 2]
    assert ppl.split_windows(stream, 3) == [[3, 4, 2], [5, 6, 7]]
    assert ppl.split_windows(stream, 2, max_windows=1) == [[3, 4]]
    with pytest.raises(ValueError, match="fewer than one window"):
        ppl.split_windows(stream, 8)
    with pytest.raises(ValueError, match="--data_dir"):
        ppl.load_documents("unknown_dataset")
    with pytest.raises(FileNotFoundError, match="no \\*.txt"):
        ppl.load_documents("x", tmp_path / "missing")


def test_grid_rows_csv_columns_and_plots(tmp_path: Path) -> None:
    model = tiny_model("llama")
    data = windows(2, 64)
    specs = grid.grid_specs(["snapkv", "streamingllm"], [0.25, 0.5], "ratio", {"snapkv": {"window_size": 4}})
    assert [s.label for s, _ in specs] == ["fullkv", "snapkv@0.25", "snapkv@0.5", "streamingllm@0.25",
                                           "streamingllm@0.5"]
    rows = grid.run_dataset(model, data, specs, unit="ratio", prefix_ratio=0.5, suffix_chunk=None, partial=None,
                            key_prefix="test", speed={"new_tokens": 3, "repeats": 1, "warmup": 0}, progress=False)
    for row in rows:
        row.update(model="tiny", dataset="generated", max_length=64, prefix_ratio=0.5)
    csv_path, json_path = write_rows(rows, tmp_path / "tiny_generated_kv_metrics")
    with open(csv_path, newline="") as handle:
        columns = set(next(csv.reader(handle)))
    expected = {"label", "method", "budget", "ppl", "ppl_delta", "ppl_delta_pct", "next_token_acc",
                "next_token_acc_delta", "kept_tokens", "cache_bytes", "prefill_seconds", "ttft_seconds",
                "tpot_seconds", "throughput_tokens_per_second", "total_seconds", "peak_memory_bytes",
                "prefill_speedup", "ttft_speedup", "tpot_speedup", "throughput_ratio", "cache_bytes_ratio",
                "peak_memory_ratio", "ppl_ratio_ci95_low", "ppl_ratio_ci95_high", "dataset", "model"}
    assert expected <= columns, expected - columns
    loaded = json.loads(json_path.read_text())
    assert loaded[0]["label"] == "fullkv" and loaded[0]["ppl_delta"] == 0 and loaded[0]["tpot_speedup"] == 1
    assert loaded[1]["kept_tokens"] == pytest.approx(8.0)  # 0.25 of the 32-token prefix
    paths = plot_budget_curves(loaded, tmp_path)
    assert {p.name for p in paths} == {"tiny_generated_ppl_vs_budget.png", "tiny_generated_tpot_vs_budget.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_grid_resumes_from_partial_results(tmp_path: Path) -> None:
    from kvfactory.benchmarks.common import ResultsFile

    model = tiny_model("llama")
    data = windows(2, 32)
    specs = grid.grid_specs(["streamingllm"], [8], "tokens")
    partial = ResultsFile(tmp_path / "partial.jsonl", key="key")
    first = grid.run_dataset(model, data, specs, unit="tokens", prefix_ratio=0.5, suffix_chunk=None, partial=partial,
                             key_prefix="k", speed=None, progress=False)
    again = grid.run_dataset(model, data, specs, unit="tokens", prefix_ratio=0.5, suffix_chunk=None,
                             partial=ResultsFile(tmp_path / "partial.jsonl", key="key"), key_prefix="k", speed=None,
                             progress=False)
    assert [r["ppl"] for r in again] == [r["ppl"] for r in first]
    assert len((tmp_path / "partial.jsonl").read_text().splitlines()) == 2


def test_budget_errors_name_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="ratio, tokens"):
        grid.budget_params(0.5, "percent")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        grid.budget_params(1.5, "ratio")
    with pytest.raises(ValueError, match="not in --methods"):
        grid.grid_specs(["snapkv"], [0.5], "ratio", {"h2o": {"sink_size": 4}})


def test_streaming_plot(tmp_path: Path) -> None:
    model = tiny_model("llama")
    tokens = random_prompt(40, seed=4)[0].tolist()
    records = []
    for result, mode in ((ppl.streaming_ppl(model, tokens, progress=False), "streaming"),
                         (ppl.chunked_ppl(model, tokens, 8, progress=False), "chunked")):
        records.append({**vars(result), **result.as_row(), "mode": mode, "chunk_size": 1, "window": 8})
    path = plot_streaming(records, tmp_path / "stream.png")
    assert path.exists() and path.stat().st_size > 1000


def test_ppl_cli_suffix_streaming_grid_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random
    import sys

    from kvfactory.benchmarks import common

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    import run_ppl

    texts = tmp_path / "texts"
    texts.mkdir()
    rng = random.Random(0)
    for name in ("a", "b"):
        (texts / f"{name}.txt").write_text(" ".join(f"w{rng.randrange(60)}" for _ in range(90)))
    model = tiny_model("llama")
    monkeypatch.setattr(common, "load_model", lambda args: (model, WordTokenizer()))
    out = tmp_path / "out"
    shared = ["--data_dir", str(texts), "--output_dir", str(out), "--model_path", "tiny"]
    assert run_ppl.main(["suffix", "--method", "snapkv", "--max_capacity_prompts", "8", "--window_size", "2",
                         "--max_length", "32", "--max_windows", "2", *shared]) == 0
    rows = json.loads((out / "suffix" / "tiny_pg_essays_snapkv_suffix_ppl.json").read_text())
    assert [r["label"] for r in rows] == ["fullkv", "snapkv"] and rows[1]["kept_tokens"] == 8
    assert run_ppl.main(["streaming", "--methods", "fullkv", "streamingllm:max_capacity_prompt=16,decode_budget=16@s16",
                         "--num_eval_tokens", "61", "--chunk_size", "2", "--fullkv_chunk_size", "20",
                         "--baseline_window", "16", *shared]) == 0
    records = json.loads((out / "streaming" / "tiny_pg_essays_streaming_ppl.json").read_text())
    assert [(r["label"], r["mode"], r["chunk_size"]) for r in records] == [
        ("fullkv", "streaming", 20), ("s16", "streaming", 2), ("chunked fullkv (window 16)", "chunked", 16)]
    assert all(r["tokens"] == 60 for r in records) and records[1]["kept_tokens"] == 16
    assert records[0]["ppl_delta_pct_vs_fullkv"] == 0 and len(records[1]["step_seconds"]) == 30
    assert run_ppl.main(["grid", "--methods", "streamingllm", "--budgets", "0.5", "--max_length", "32",
                         "--max_windows", "2", "--new_tokens", "2", "--repeats", "1", "--warmup", "0",
                         "--datasets", "texts", *shared]) == 0
    grid_rows = json.loads((out / "grid" / "tiny_texts_kv_metrics.json").read_text())
    assert [r["label"] for r in grid_rows] == ["fullkv", "streamingllm@0.5"]
    assert grid_rows[1]["kept_tokens"] == 8 and "tpot_speedup" in grid_rows[1]
    monkeypatch.setattr(sys, "argv", ["run_ppl.py", "plot", "--results_dir", str(out)])
    assert run_ppl.main() == 0
    assert {p.name for p in out.rglob("*.png")} == {"tiny_texts_ppl_vs_budget.png", "tiny_texts_tpot_vs_budget.png",
                                                   "tiny_pg_essays_streaming_ppl.png"}
    assert run_ppl.main(["nosuch"]) == 2


def test_hub_datasets_are_read_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, config=None, split=None, streaming=False):
        calls.append((path, config, split, streaming))
        return [{"text": " = Title = \n"}, {"text": "\n"}, {"text": " one line \n"}, {"text": "another\n"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert ppl.load_documents("wikitext2") == ["= Title =", "one line", "another"]  # line-wise, empty lines dropped
    assert ppl.load_documents("pg19", max_documents=2) == [" = Title = \n", "\n"]  # whole books
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test", False), ("emozilla/pg19-test", None, "test", True)]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="online"):
        ppl.load_documents("pg19")
