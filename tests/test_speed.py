"""Timing primitives, side-by-side comparisons with ratios to FullKV, the context sweep and the speed CLI (tiny models)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvfactory
from conftest import random_prompt, tiny_model
from kvfactory.benchmarks import speed
from kvfactory.benchmarks.efficiency_plots import plot_latency_vs_context, plot_results_dir
from kvfactory.benchmarks.memory import CPU_COUNT


def test_measure_and_run_once_keep_their_contract() -> None:
    model = tiny_model("llama")
    ids = random_prompt(40)
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16, window_size=4):
        result = speed.measure(model, ids, method="snapkv", new_tokens=5, repeats=2, warmup=1)
        ttft, steps, (cache, kept, prefill_bytes) = speed.run_once(model, ids, 4)
    assert result.context_length == 40 and result.new_tokens == 5 and len(result.step_seconds) == 8
    assert 0 < result.prefill_seconds <= result.ttft_seconds <= result.total_seconds
    assert result.total_seconds == pytest.approx(result.ttft_seconds + result.decode_seconds)
    assert result.kept_tokens == pytest.approx(16.0)
    assert result.prefill_cache_bytes < result.cache_bytes  # three appended tokens
    # the tensor peak (an untimed, counted run) holds at least the cache the run leaves
    assert result.peak_memory_how == CPU_COUNT and result.peak_memory_over_start_bytes >= result.cache_bytes > 0
    assert ttft > 0 and len(steps) == 3 and kept == [16.0, 16.0] and 0 < prefill_bytes < cache.nbytes()
    assert "step_seconds" not in result.as_row()


def test_unpatched_model_is_measured_with_a_dynamic_cache() -> None:
    result = speed.measure(tiny_model("gpt-neox"), random_prompt(20), method="unpatched", new_tokens=3, repeats=1)
    assert result.cache_bytes > 0 and result.kept_tokens == 20


def test_compare_gives_ratios_against_fullkv() -> None:
    model = tiny_model("llama")
    specs = [speed.parse_method_spec("fullkv"),
             speed.parse_method_spec("streamingllm:max_capacity_prompt=16,decode_budget=16@sl16"),
             speed.parse_method_spec("unpatched")]
    runs = []
    results = speed.compare(model, random_prompt(64), specs, new_tokens=4, repeats=2, warmup=1,
                            on_run=lambda: runs.append(1))
    assert len(runs) == 6 and [r.label for r in results] == ["fullkv", "sl16", "unpatched"]
    rows = speed.rows_with_ratios(results)
    assert all(rows[0][name] == 1 for name in speed.RATIO_COLUMNS)
    assert rows[1]["cache_bytes_ratio"] < 0.35  # 16 + appended vs 64 + appended tokens
    assert all(rows[1][name] > 0 for name in speed.RATIO_COLUMNS)
    assert getattr(model, "_kvfactory_handle", None) is None  # every patch was removed
    with pytest.raises(ValueError, match="no result labelled"):
        speed.rows_with_ratios(results, "h2o")


def test_sweep_shows_a_bounded_cache(tmp_path: Path) -> None:
    model = tiny_model("mistral")
    ids = random_prompt(96)
    specs = [speed.MethodSpec("fullkv"), speed.MethodSpec("streamingllm", {"max_capacity_prompt": 8,
                                                                           "decode_budget": 8}, "bounded")]
    rows = speed.sweep(model, lambda n: ids[:, :n], [32, 96], specs, new_tokens=3, repeats=1, warmup=0,
                       progress=False)
    assert [(r["context_length"], r["label"]) for r in rows] == [(32, "fullkv"), (32, "bounded"), (96, "fullkv"),
                                                                 (96, "bounded")]
    assert rows[1]["cache_bytes"] == rows[3]["cache_bytes"]  # bounded: the same bytes at every length
    assert rows[2]["cache_bytes"] > rows[0]["cache_bytes"]
    path = plot_latency_vs_context(rows, tmp_path / "latency.png")
    assert path.stat().st_size > 1000


def test_method_specs() -> None:
    spec = speed.parse_method_spec("l2norm:max_capacity_prompt=32,skip_layers=[0,1],window_size=2")
    assert spec.method == "l2norm" and spec.params == {"max_capacity_prompt": 32, "skip_layers": [0, 1],
                                                        "window_size": 2}
    assert spec.label == "l2norm:max_capacity_prompt=32,skip_layers=[0,1],window_size=2"
    assert speed.parse_method_spec("snapkv:merge=pivot@snap").params == {"merge": "pivot"}
    with pytest.raises(ValueError, match="accepted parameters"):
        speed.parse_method_spec("snapkv:sinks=4")
    with pytest.raises(ValueError, match="accepted methods"):
        speed.parse_method_spec("nosuch")
    with pytest.raises(ValueError, match="key=value"):
        speed.parse_method_spec("snapkv:256")


def _peak(model, ids, method: str = "fullkv", **params) -> speed.SpeedResult:
    with kvfactory.patch(model, method, **params):
        return speed.measure(model, ids, method=method, new_tokens=3, repeats=1, warmup=0)


def test_peak_grows_with_the_context_by_at_least_the_kv_bytes() -> None:
    """Issue 19 case 12: the peak is the run's own tensors (counted in an untimed run), not the process's RSS, so a
    longer context reports a larger peak by at least the KV bytes it adds, in any test order."""
    model = tiny_model("llama")
    short, long = _peak(model, random_prompt(64)), _peak(model, random_prompt(256))
    added_kv = long.cache_bytes - short.cache_bytes
    assert added_kv > 0 and long.peak_memory_over_start_bytes - short.peak_memory_over_start_bytes >= added_kv
    assert long.peak_memory_how == short.peak_memory_how == CPU_COUNT


def test_peak_of_fullkv_exceeds_snapkv_at_a_small_budget() -> None:
    model = tiny_model("llama")
    specs = [speed.MethodSpec("fullkv"), speed.MethodSpec("snapkv", {"max_capacity_prompt": 16}, "snapkv16")]
    full, snap = speed.compare(model, random_prompt(256), specs, new_tokens=3, repeats=1, warmup=0)
    saved_kv = full.cache_bytes - snap.cache_bytes
    assert saved_kv > 0 and full.peak_memory_over_start_bytes - snap.peak_memory_over_start_bytes >= saved_kv / 2
    assert speed.rows_with_ratios([full, snap])[1]["peak_memory_over_start_ratio"] < 1
    untracked = speed.compare(model, random_prompt(32), specs[:1], new_tokens=2, repeats=1, warmup=0,
                              track_memory=False)[0]
    assert untracked.peak_memory_how == speed.RSS_COUNT  # no counted run: the coarse process figure, and says so


def test_peak_is_the_runs_own_whatever_ran_before() -> None:
    """A transient block inside the run shows in its peak; one before it, or a larger earlier run, does not (the
    process's VmHWM failed both: in the full suite it did not move at all)."""
    import torch

    model = tiny_model("llama")
    ids = random_prompt(64)
    first = _peak(model, ids).peak_memory_over_start_bytes
    _peak(model, random_prompt(512))  # a larger run, then a 256 MiB block held and freed, before the same run
    block = torch.ones(64, 2**20)
    block.add_(1)
    del block
    assert _peak(model, ids).peak_memory_over_start_bytes == first
    def transient(module, args, output) -> None:
        torch.ones(16, 2**20).sum()

    hook = model.model.layers[0].register_forward_hook(transient)
    try:  # a 64 MiB tensor made and dropped inside every forward
        inflated = _peak(model, ids).peak_memory_over_start_bytes
    finally:
        hook.remove()
    assert first < 16 * 2**20 and inflated >= first + 48 * 2**20


def test_speed_cli_on_a_random_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    import run_speed

    code = run_speed.main(["--config", "tiny-llama", "--context_lengths", "24,48", "--new_tokens", "3",
                           "--repeats", "1", "--warmup", "0", "--output_dir", str(tmp_path),
                           "--methods", "streamingllm:max_capacity_prompt=16,decode_budget=16@C16"])
    assert code == 0
    stem = tmp_path / "speed" / "random-tiny-llama_random_speed_vs_context"
    rows = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["context_length"], r["label"]) for r in rows] == [(24, "fullkv"), (24, "C16"), (48, "fullkv"),
                                                                 (48, "C16")]
    assert stem.with_suffix(".csv").exists() and stem.with_suffix(".png").exists()
    assert (tmp_path / "speed" / "run_meta.json").exists()
    assert plot_results_dir(tmp_path) == [stem.with_suffix(".png")]
