"""PNG plots of the efficiency results (matplotlib, Agg backend): accuracy and cost against the budget, latency
against the context length, and streaming latency / running PPL against the position in the stream.

``python run_ppl.py plot --results_dir results_ppl`` redraws every plot from the JSON files the runners wrote:
``*_kv_metrics.json`` (grid), ``*_speed_vs_context.json`` (``run_speed.py``), ``*_streaming_ppl.json`` (streaming).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

SECONDS_SUFFIX = "_seconds"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scaled(metric: str, value: float) -> float:
    return value * 1e3 if metric.endswith(SECONDS_SUFFIX) else value


def _axis_label(metric: str) -> str:
    if metric == "ppl":
        return "suffix PPL"
    return metric[: -len(SECONDS_SUFFIX)].upper() + " (ms)" if metric.endswith(SECONDS_SUFFIX) else metric


def _save(figure: Any, axes: Sequence[Any], path: Path, title: str, legends: Sequence[Any] | None = None) -> Path:
    """Grid on every axis, legends (on ``legends``, default every axis), the title, then write the PNG."""
    for axis in axes:
        axis.grid(alpha=0.3)
    for axis in axes if legends is None else legends:
        axis.legend(fontsize=8)
    if len(axes) == 1:
        axes[0].set_title(title)
    else:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def _budget_plot(rows: Sequence[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    baseline = None
    for row in rows:
        if row.get(metric) is None or (isinstance(row[metric], float) and math.isnan(row[metric])):
            continue
        if row.get("budget") in (None, ""):
            baseline = _scaled(metric, row[metric])
        else:
            by_method[row["method"]].append((float(row["budget"]), _scaled(metric, row[metric])))
    for method, points in sorted(by_method.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    if baseline is not None:
        axis.axhline(baseline, color="black", linestyle="--", linewidth=1, label="fullkv")
    unit = next((row.get("budget_unit") for row in rows if row.get("budget_unit")), "ratio")
    axis.set_xlabel({"ratio": "budget (share of the prefix kept)",
                     "compression_ratio": "compression ratio (share of the prefix removed, kvpress)"}.get(
                         unit, "budget (tokens kept per layer/head)"))
    axis.set_ylabel(_axis_label(metric))
    if metric == "ppl" and baseline is not None:
        values = [v for points in by_method.values() for _, v in points] + [baseline]
        if max(values) > 3 * baseline:  # one method far off would flatten the rest: log scale
            axis.set_yscale("log")
    return _save(figure, [axis], path, title)


def plot_budget_curves(rows: Sequence[dict[str, Any]], folder: Path, time_metric: str | None = "tpot_seconds"
                       ) -> list[Path]:
    """``{model}_{dataset}_ppl_vs_budget.png`` and ``{model}_{dataset}_{time_metric}_vs_budget.png`` per dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row.get("model", "model")), str(row.get("dataset", "data")))].append(row)
    paths = []
    for (model, dataset), group in groups.items():
        setting = f"max_length {group[0].get('max_length')}, prefix {group[0].get('prefix_ratio')}"
        paths.append(_budget_plot(group, "ppl", folder / f"{model}_{dataset}_ppl_vs_budget.png",
                                  f"{model} on {dataset}: suffix PPL ({setting})"))
        if time_metric and any(time_metric in row for row in group):
            name = time_metric.replace(SECONDS_SUFFIX, "")
            paths.append(_budget_plot(group, time_metric, folder / f"{model}_{dataset}_{name}_vs_budget.png",
                                      f"{model} on {dataset}: {_axis_label(time_metric)} at the prefix length"))
    return paths


def plot_latency_vs_context(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Three panels against the context length, one line per configuration: TPOT, TTFT, cache MiB."""
    plt = _pyplot()
    panels = (("tpot_seconds", "TPOT (ms)"), ("ttft_seconds", "TTFT (ms)"), ("cache_bytes", "cache after decode (MiB)"))
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_label[row.get("label") or row["method"]].append(row)
    for label, group in by_label.items():
        group.sort(key=lambda r: r["context_length"])
        lengths = [r["context_length"] for r in group]
        for axis, (metric, name) in zip(axes, panels):
            scale = 1e3 if metric.endswith(SECONDS_SUFFIX) else 1 / 2**20
            axis.plot(lengths, [r[metric] * scale for r in group], marker="o", label=label)
    for axis, (_, name) in zip(axes, panels):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(name)
    return _save(figure, axes, path, title or "latency and cache size against the context length", legends=axes[:1])


def _rolling_median(values: Sequence[float], width: int) -> list[float]:
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    return [float(np.median(data[max(0, i - width + 1) : i + 1])) for i in range(len(data))]


def plot_streaming(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Latency per fed chunk (rolling median over 64 chunks) and running PPL against the position in the stream, for
    the streaming records (``step_seconds``, ``window_nll`` per fed chunk, ``chunk_size``); a record fed in chunks of
    more than one token is labelled with its chunk size (its latency is that of a whole chunk)."""
    import numpy as np

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    final_ppl = []
    for record in records:
        chunk = record.get("chunk_size") or 1
        steps, nll = record.get("step_seconds") or [], record.get("window_nll") or []
        if record.get("mode") == "streaming" and steps:
            positions = np.arange(1, len(steps) + 1) * chunk
            name = record["label"] + (f" ({chunk}-token chunks)" if chunk > 1 else "")
            left.plot(positions, [s * 1e3 for s in _rolling_median(steps, 64)], label=name, linewidth=1)
        if nll:
            width = record.get("window", chunk) if record.get("mode") == "chunked" else chunk
            counts = np.minimum(np.arange(1, len(nll) + 1) * width, record["tokens"])
            running = np.exp(np.cumsum(nll) / counts)
            right.plot(counts, running, label=record["label"], linewidth=1)
            final_ppl.append(float(running[-1]))
    left.set_xlabel("position in the stream (tokens)")
    left.set_ylabel("latency per fed chunk (ms, rolling median)")
    right.set_xlabel("tokens scored")
    right.set_ylabel("running PPL")
    if final_ppl:  # the first few tokens' PPL is huge: keep the scale of the end values
        right.set_ylim(0, 2 * max(final_ppl))
    return _save(figure, (left, right), path, title or "streaming perplexity")


def plot_results_dir(results_dir: Path, time_metric: str = "tpot_seconds") -> list[Path]:
    """Redraw every plot from the JSON results under ``results_dir`` (beside each JSON file)."""
    paths: list[Path] = []
    for source in sorted(results_dir.rglob("*_kv_metrics.json")):
        paths += plot_budget_curves(json.loads(source.read_text()), source.parent, time_metric)
    for source in sorted(results_dir.rglob("*_speed_vs_context.json")):
        stem = source.name[: -len(".json")]
        paths.append(plot_latency_vs_context(json.loads(source.read_text()), source.parent / f"{stem}.png", stem))
    for source in sorted(results_dir.rglob("*_streaming_ppl.json")):
        stem = source.name[: -len(".json")]
        paths.append(plot_streaming(json.loads(source.read_text()), source.parent / f"{stem}.png", stem))
    if not paths:
        logger.warning("no *_kv_metrics.json, *_speed_vs_context.json or *_streaming_ppl.json under %s", results_dir)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``run_ppl.py plot`` (which passes them to :func:`plot_results_dir` and prints the paths)."""
    parser = argparse.ArgumentParser(prog="run_ppl.py plot", description=__doc__.split("\n")[0])
    parser.add_argument("--results_dir", type=Path, default=Path("results_ppl"))
    parser.add_argument("--time_metric", default="tpot_seconds",
                        help="time column against the budget: tpot_seconds, ttft_seconds, prefill_seconds, "
                             "total_seconds, throughput_tokens_per_second, tpot_speedup, ...")
    return parser.parse_args(argv)
