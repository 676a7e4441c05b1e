"""The efficiency grid: methods × budgets × datasets, suffix PPL and speed/memory, every ratio against FullKV.

For each dataset: token windows (``max_length``, non-overlapping, documents joined with EOS), suffix PPL of FullKV and
of every method at every budget (:func:`kvfactory.benchmarks.ppl.suffix_ppl`), then the speed of every configuration
on the first window's prefix, measured round-robin in the same run (:func:`kvfactory.benchmarks.speed.compare`).
Writes ``{model}_{dataset}_kv_metrics.csv`` and ``.json`` (one row per configuration, FullKV first) under
``{output_dir}/grid``; PPL results are also kept in a resumable JSONL (``partial/``) so an interrupted grid resumes.

``python run_ppl.py grid --methods snapkv,h2o --budgets 0.1,0.3,0.5,0.7`` (see ``--help``).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kvfactory.benchmarks import ppl
from kvfactory.benchmarks.common import ResultsFile, add_model_arguments, model_label, parse_list, write_run_meta
from kvfactory.benchmarks.speed import MethodSpec, compare, rows_with_ratios, write_rows

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "snapkv,pyramidkv,streamingllm,h2o,l2norm"
# ratio: the share KEPT (kvfactory's max_capacity_prompt_ratio); tokens: max_capacity_prompt; compression_ratio: the
# share REMOVED (kvpress's convention: knorm/lagkv take it as is, the others keep 1 - r of the prefix)
BUDGET_UNITS = ("ratio", "tokens", "compression_ratio")


def budget_params(budget: float, unit: str, method: str = "") -> dict[str, Any]:
    """``max_capacity_prompt_ratio`` (a share of the prefix kept), ``max_capacity_prompt`` (tokens), or kvpress's
    ``compression_ratio`` (a share removed: passed as is to the methods that take it, else ``1 - r`` kept)."""
    if unit == "compression_ratio":
        from kvfactory import methods as registry

        if not 0 <= budget < 1:
            raise ValueError(f"a compression_ratio (share removed) must be in [0, 1), got {budget}")
        if method and "compression_ratio" in registry.parameters(method):
            return {"compression_ratio": float(budget)}
        return {"max_capacity_prompt_ratio": round(1 - float(budget), 10)}
    if unit == "ratio":
        if not 0 < budget <= 1:
            raise ValueError(f"a ratio budget must be in (0, 1], got {budget}")
        return {"max_capacity_prompt_ratio": float(budget)}
    if unit == "tokens":
        if budget < 1 or budget != int(budget):
            raise ValueError(f"a token budget must be a positive integer, got {budget}")
        return {"max_capacity_prompt": int(budget)}
    raise ValueError(f"budget unit {unit!r}: use one of {', '.join(BUDGET_UNITS)}")


def grid_specs(methods: Sequence[str], budgets: Sequence[float], unit: str,
               method_kwargs: dict[str, dict[str, Any]] | None = None) -> list[tuple[MethodSpec, float | None]]:
    """FullKV, then every method × budget, as (spec, budget); ``method_kwargs[name]`` adds parameters to a method."""
    from kvfactory import methods as registry

    extra = method_kwargs or {}
    unknown = sorted(set(extra) - {registry.method_class(m).name for m in methods})
    if unknown:
        raise ValueError(f"--method_kwargs names {', '.join(unknown)}, which are not in --methods")
    specs: list[tuple[MethodSpec, float | None]] = [(MethodSpec("fullkv", {}, "fullkv"), None)]
    for method in methods:
        name = registry.method_class(method).name
        if name == "fullkv":
            continue
        for budget in budgets:
            params = {**budget_params(budget, unit, name), **extra.get(name, {})}
            registry.get(name, **params)  # fail before any model runs
            specs.append((MethodSpec(name, params, f"{name}@{budget:g}"), budget))
    return specs


def paired_ratio_interval(nll: Sequence[float], baseline_nll: Sequence[float], tokens_per_window: int,
                          samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval (over windows) of PPL(method) / PPL(baseline)."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(baseline_nll, dtype=np.float64)
    if len(a) != len(b) or len(a) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(samples, len(a)))
    ratio = np.exp((a[picks].sum(1) - b[picks].sum(1)) / (tokens_per_window * len(a)))
    low, high = np.quantile(ratio, [0.025, 0.975])
    return float(low), float(high)


def ppl_rows(results: Sequence[ppl.PPLResult], budgets: Sequence[float | None], *, unit: str, prefix_tokens: int
             ) -> list[dict[str, Any]]:
    """One row per configuration with PPL / accuracy deltas and the paired PPL-ratio interval against FullKV."""
    full = results[0]
    rows = []
    for result, budget in zip(results, budgets):
        low, high = paired_ratio_interval(result.window_nll, full.window_nll, result.tokens // max(result.windows, 1))
        row = result.as_row()
        row.pop("label")
        rows.append({
            "label": result.label, "budget": budget, "budget_unit": unit if budget is not None else "",
            **row, "params": json.dumps(result.params), "prefix_tokens": prefix_tokens,
            "kept_fraction": result.kept_tokens / prefix_tokens,
            "ppl_delta": result.ppl - full.ppl, "ppl_delta_pct": 100 * (result.ppl / full.ppl - 1),
            "ppl_ratio_ci95_low": low, "ppl_ratio_ci95_high": high,
            "next_token_acc_delta": result.accuracy - full.accuracy, "eval_seconds": result.seconds,
        })
        rows[-1].pop("seconds")
    return rows


def run_dataset(model: Any, windows: Sequence[Sequence[int]], specs: Sequence[tuple[MethodSpec, float | None]], *,
                unit: str, prefix_ratio: float, suffix_chunk: int | None, partial: ResultsFile | None,
                key_prefix: str, speed: dict[str, int] | None, progress: bool = True,
                save: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Suffix PPL of every spec (resumed from ``partial``), then speed round-robin unless ``speed`` is None.
    ``save(rows)`` is called with the PPL rows before the speed runs and again with the complete rows."""
    results = []
    for spec, _ in specs:
        key = f"{key_prefix}|{spec.label}|{json.dumps(spec.params, sort_keys=True)}"
        if partial is not None and partial.done(key):
            record = next(r for r in partial.records if r["key"] == key)
            results.append(ppl.PPLResult(**record["result"]))
            continue
        result = ppl.suffix_ppl(model, windows, method=spec.method, params=spec.params, prefix_ratio=prefix_ratio,
                                suffix_chunk=suffix_chunk, label=spec.label, progress=progress)
        logger.info("%s: ppl %.4f over %d tokens", spec.label, result.ppl, result.tokens)
        if partial is not None:
            partial.append({"key": key, "result": {k: v for k, v in vars(result).items()}})
        results.append(result)
    prefix_tokens = round(len(windows[0]) * prefix_ratio)
    rows = ppl_rows(results, [budget for _, budget in specs], unit=unit, prefix_tokens=prefix_tokens)
    if save is not None:
        save(rows)
    if speed is None:
        return rows
    import torch
    from tqdm import tqdm

    prompt = torch.tensor([list(windows[0][:prefix_tokens])], device=next(model.parameters()).device)
    bar = tqdm(total=len(specs) * speed["repeats"], desc="speed", unit="run", disable=not progress)
    timing = rows_with_ratios(compare(model, prompt, [spec for spec, _ in specs], on_run=lambda: bar.update(1),
                                      **speed))
    bar.close()
    for row, measured in zip(rows, timing):
        for name in ("label", "method", "kept_tokens"):
            measured.pop(name)
        row.update(measured)
    if save is not None:
        save(rows)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_ppl.py grid", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--datasets", default=ppl.DEFAULT_DATASET,
                        help=f"comma-separated: {ppl.DEFAULT_DATASET} (text files of --data_dir), "
                             f"{', '.join(ppl.HF_DATASETS)} (online)")
    parser.add_argument("--data_dir", default=None, help="folder of .txt files (default: the shared PG essays)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; fullkv is always run")
    parser.add_argument("--budgets", default="0.1,0.3,0.5,0.7", help="comma-separated budgets")
    parser.add_argument("--budget_unit", default="ratio", choices=BUDGET_UNITS,
                        help="ratio: share of the prefix KEPT (max_capacity_prompt_ratio); tokens: max_capacity_prompt; "
                             "compression_ratio: share REMOVED (kvpress's convention)")
    parser.add_argument("--method_kwargs", default=None, help='JSON {"method": {"param": value}} added per method')
    parser.add_argument("--max_length", type=int, default=1024, help="window length in tokens")
    parser.add_argument("--prefix_ratio", type=float, default=0.5, help="share of the window prefilled (compressed)")
    parser.add_argument("--max_windows", type=int, default=32, help="windows per dataset (from the start)")
    parser.add_argument("--suffix_chunk", type=int, default=None, help="suffix tokens per forward (default: all)")
    parser.add_argument("--new_tokens", type=int, default=32, help="generated tokens per speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no_speed", action="store_true", help="PPL only")
    parser.add_argument("--time_metric", default="tpot_seconds", help="the time column plotted against the budget")
    parser.add_argument("--output_dir", type=Path, default=Path("results_ppl"))
    parser.add_argument("--no_plots", action="store_true")
    return parser.parse_args(argv)


@dataclass
class DatasetGrid:
    """One dataset of the grid: its rows (FullKV first), the CSV they were written to and the plots drawn."""

    dataset: str
    windows: int
    max_length: int
    prefix_ratio: float
    csv_path: Path
    rows: list[dict[str, Any]]
    plots: list[Path] = field(default_factory=list)

    def report(self) -> str:
        """The dataset's summary for the command line: a header line, :func:`format_table` and the plots drawn."""
        header = (f"\n{self.dataset}: {self.windows} windows of {self.max_length} tokens, "
                  f"prefix {self.prefix_ratio:g} -> {self.csv_path}")
        return "\n".join([header, format_table(self.rows), *(f"plot: {path}" for path in self.plots)])


def run_grid(args: argparse.Namespace, on_dataset: Callable[[DatasetGrid], None] | None = None) -> list[DatasetGrid]:
    """Run the grid :func:`parse_args` describes: load the model, then every dataset in turn, each written under
    ``{output_dir}/grid`` (and plotted unless ``--no_plots``) as it finishes; ``on_dataset`` is called with each
    finished dataset (``run_ppl.py grid`` prints its :meth:`DatasetGrid.report`)."""
    extra = json.loads(args.method_kwargs) if args.method_kwargs else {}
    specs = grid_specs(parse_list(args.methods), parse_list(args.budgets, float), args.budget_unit, extra)
    datasets = parse_list(args.datasets)
    from kvfactory.benchmarks.common import load_model

    model, tokenizer = load_model(args)
    label = model_label(args.model_path)
    folder = args.output_dir / "grid"
    write_run_meta(folder, args, {"specs": [(s.label, s.method, s.params) for s, _ in specs]})
    speed = None if args.no_speed else {"new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup}
    finished = []
    for dataset in datasets:
        stream = ppl.token_stream(tokenizer, ppl.load_documents(dataset, args.data_dir))
        windows = ppl.split_windows(stream, args.max_length, args.max_windows)
        partial = ResultsFile(folder / "partial" / f"{label}_{dataset}_ppl.jsonl", key="key")
        key_prefix = f"{dataset}|{args.max_length}|{args.prefix_ratio}|{len(windows)}|{args.suffix_chunk}"
        stem = folder / f"{label}_{dataset}_kv_metrics"

        def save(rows: list[dict[str, Any]], dataset: str = dataset, stem: Path = stem) -> None:
            for row in rows:
                row.update(model=label, dataset=dataset, max_length=args.max_length, prefix_ratio=args.prefix_ratio)
            write_rows(rows, stem)

        rows = run_dataset(model, windows, specs, unit=args.budget_unit, prefix_ratio=args.prefix_ratio,
                           suffix_chunk=args.suffix_chunk, partial=partial, key_prefix=key_prefix, speed=speed,
                           save=save)
        result = DatasetGrid(dataset=dataset, windows=len(windows), max_length=args.max_length,
                             prefix_ratio=args.prefix_ratio, csv_path=stem.with_suffix(".csv"), rows=rows)
        if not args.no_plots:
            from kvfactory.benchmarks.efficiency_plots import plot_budget_curves

            result.plots = plot_budget_curves(rows, folder, time_metric=args.time_metric if speed else None)
        finished.append(result)
        if on_dataset is not None:
            on_dataset(result)
    if len(finished) > 1:  # one combined CSV across datasets
        write_rows([row for grid in finished for row in grid.rows], folder / f"{label}_combined_kv_metrics")
    return finished


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the grid rows (PPL, deltas, accuracy, and the time ratios when measured)."""
    timed = "tpot_seconds" in rows[0]
    head = f"{'config':<18}{'kept':>7}{'PPL':>9}{'dPPL%':>8}{'95% CI ratio':>16}{'acc':>7}"
    if timed:
        head += f"{'TTFT ms':>9}{'TPOT ms':>9}{'tpot x':>8}{'cache x':>8}"
    lines = [head]
    for r in rows:
        interval = f"[{r['ppl_ratio_ci95_low']:.3f},{r['ppl_ratio_ci95_high']:.3f}]"
        line = (f"{r['label']:<18}{r['kept_tokens']:>7.1f}{r['ppl']:>9.3f}{r['ppl_delta_pct']:>+8.2f}"
                f"{interval:>16}{r['next_token_acc']:>7.3f}")
        if timed:
            line += (f"{r['ttft_seconds'] * 1e3:>9.1f}{r['tpot_seconds'] * 1e3:>9.1f}{r['tpot_speedup']:>8.2f}"
                     f"{r['cache_bytes_ratio']:>8.3f}")
        lines.append(line)
    return "\n".join(lines)
