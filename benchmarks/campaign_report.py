"""Tables, heatmaps and ordering checks of a method-comparison campaign (scripts/campaign/qwen.sh), from whatever
results exist so far (the campaign is resumable; missing runs show as "-").

``python -m benchmarks.campaign_report [--campaign_dir benchmarks/results/qwen2.5-coder-0.5b]
[--figures docs/figures] [--write docs/results.md]``

Prints markdown; with ``--write`` it replaces the part of that file between ``<!-- campaign:begin -->`` and
``<!-- campaign:end -->``, and saves LongBench's per-sample scores beside its predictions (``*.scores.json``: the
predictions hold the datasets' gold answers, third-party text that is not committed; the scores are). Every comparison of two methods is paired on the same samples, with a 95% percentile
bootstrap interval of the mean difference (:mod:`kvfactory.metrics.bootstrap`); a difference is called only when the
interval excludes zero.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from kvfactory.benchmarks.passkey import passkey_found
from kvfactory.metrics.bootstrap import paired_bootstrap
from kvfactory.metrics.files import jsonl_lines

BEGIN, END = "<!-- campaign:begin -->", "<!-- campaign:end -->"
METHOD_ORDER = ("fullkv", "snapkv", "pyramidkv", "adakv", "h2o", "streamingllm")
# (benchmark, budget, method) -> {sample key: score in [0, 1]}
Scores = dict[tuple[str, str, str], dict[tuple, float]]


def _order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _budget(folder: Path) -> str:
    return folder.name.rsplit("_", 1)[-1]


def _records(path: Path) -> list[dict]:
    return [record for _, record in jsonl_lines(path) if isinstance(record, dict)]


def read_passkey(root: Path, scores: Scores) -> None:
    for folder in sorted((root / "passkey").glob("*_*")):
        for path in sorted(folder.glob("*.jsonl")):
            cells = {(r["length"], r["depth"], r["seed"]): float(passkey_found(r["pred"], r["passkey"]))
                     for r in _records(path)}
            scores[("passkey", _budget(folder), path.stem)] = cells


def read_needle(root: Path, scores: Scores) -> dict[tuple[str, str], Path]:
    folders = {}
    for folder in sorted((root / "needle").glob("*")):
        cells = {}
        method = budget = None
        for path in folder.glob("len_*_depth_*_results.json"):
            record = json.loads(path.read_text())
            method, budget = record["method"], "full" if record.get("budget") is None else str(record["budget"])
            cells[(int(record["context_length"]), float(record["depth_percent"]))] = float(record["recall"])
        if cells:
            scores[("needle", budget, method)] = cells
            folders[(budget, method)] = folder
    return folders


def read_ruler(root: Path, scores: Scores) -> None:
    from kvfactory.metrics.ruler import score_task

    for folder in sorted((root / "ruler").glob("*_*")):
        per_method: dict[str, dict[tuple, float]] = defaultdict(dict)
        for path in sorted(folder.glob("*/*/*.jsonl")):
            length, task = path.parent.parent.name, path.parent.name
            for record in _records(path):
                outputs = record["outputs"] if isinstance(record["outputs"], list) else [record["outputs"]]
                per_method[path.stem][(int(length), task, record["index"])] = score_task(
                    [record["pred"]], [[str(o) for o in outputs]], task) / 100
        for method, cells in per_method.items():
            scores[("ruler", _budget(folder), method)] = cells


def read_longbench(root: Path, scores: Scores, save_scores: bool = False) -> None:
    """Per-sample official scores. The predictions files hold LongBench's gold answers (third-party text) and are
    not committed; ``<dataset>/<method>.scores.json`` beside each (ids and scores only, written with
    ``save_scores``) stands in for them in a clone without the predictions."""
    from kvfactory.metrics.longbench import _sample_score, read_predictions

    for folder in sorted((root / "longbench").glob("*_*")):
        per_method: dict[str, dict[tuple, float]] = defaultdict(dict)
        for path in sorted(folder.glob("*/*.scores.json")):
            dataset, method = path.parent.name, path.name[: -len(".scores.json")]
            per_method[method].update({(dataset, key): value for key, value in json.loads(path.read_text()).items()})
        for path in sorted(folder.glob("*/*.jsonl")):
            dataset = path.parent.name
            sample_scores = {record["_id"]: _sample_score(dataset, record["pred"], record["answers"],
                                                          record.get("all_classes"))
                             for record in read_predictions(path)}
            per_method[path.stem].update({(dataset, key): value for key, value in sample_scores.items()})
            if save_scores:
                path.with_suffix(".scores.json").write_text(json.dumps(sample_scores, indent=0, sort_keys=True) + "\n")
        for method, cells in per_method.items():
            scores[("longbench", _budget(folder), method)] = cells


def _mean(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.1f}" if values else "-"


def grouped_table(scores: Scores, benchmark: str, group: Callable[[tuple], object], header: str,
                  fmt: Callable[[list[float]], str] = _mean, label: Callable[[object], str] = str) -> str:
    """One row per (budget, method), one column per ``group(sample key)`` (sorted), plus all samples and their
    count."""
    rows = sorted(((budget, method) for b, budget, method in scores if b == benchmark),
                  key=lambda bm: (bm[0] != "full", int(bm[0]) if bm[0].isdigit() else 0, _order(bm[1])))
    if not rows:
        return "(no results yet)\n"
    columns = sorted({group(key) for (b, _, _), cells in scores.items() if b == benchmark for key in cells})
    lines = [f"| method | C | {' | '.join(label(c) for c in columns)} | all | n |",
             "|---|---|" + "---|" * (len(columns) + 2)]
    for budget, method in rows:
        cells = scores[(benchmark, budget, method)]
        by_column: dict[object, list[float]] = defaultdict(list)
        for key, value in cells.items():
            by_column[group(key)].append(value)
        lines.append(f"| {method} | {budget} | " + " | ".join(fmt(by_column.get(c, [])) for c in columns)
                     + f" | {fmt(list(cells.values()))} | {len(cells)} |")
    return f"{header}\n\n" + "\n".join(lines) + "\n"


def _found(values: list[float]) -> str:
    return f"{int(sum(values))}/{len(values)}" if values else "-"


def compare(scores: Scores, benchmark: str, budget: str, first: str, second: str,
            where: Callable[[tuple], bool] = lambda key: True, first_budget: str | None = None) -> str:
    a = scores.get((benchmark, first_budget or budget, first))
    b = scores.get((benchmark, budget, second))
    if not a or not b:
        return f"{benchmark} C={budget}: {first} vs {second}: not run yet"
    keys = sorted(k for k in set(a) & set(b) if where(k))
    if not keys:
        return f"{benchmark} C={budget}: {first} vs {second}: no common samples yet"
    difference = paired_bootstrap([a[k] for k in keys], [b[k] for k in keys])
    return (f"{benchmark} C={budget}: {first} {difference.resolved} {second}, difference ×100 "
            f"{difference.text(scale=100, digits=1)}")


def orderings(scores: Scores) -> str:
    # (benchmark, budget, fullkv's budget label): fullkv's runs sit beside the C=256 ones in passkey and RULER's C=512
    # folder; the needle cells label them "full"
    retrieval = [
        ("needle", "256", "full"), ("passkey", "256", "256"), ("ruler", "512", "512"),
    ]
    lines = ["**1. fullkv ≥ snapkv ≈ pyramidkv > streamingllm on retrieval at small budgets** (SnapKV; PyramidKV)", ""]
    for benchmark, budget, full_budget in retrieval:
        for first, second in (("fullkv", "snapkv"), ("snapkv", "pyramidkv"), ("pyramidkv", "streamingllm"),
                              ("snapkv", "streamingllm")):
            lines.append("- " + compare(scores, benchmark, budget, first, second,
                                        first_budget=full_budget if first == "fullkv" else None))
    lines += ["", "**2. adakv ≥ snapkv at small budgets** (AdaKV)", ""]
    for benchmark, budget in (("needle", "256"), ("passkey", "256"), ("ruler", "512"), ("longbench", "128")):
        lines.append("- " + compare(scores, benchmark, budget, "adakv", "snapkv"))
    lines += ["", "**3. streamingllm misses middle-depth needles** (StreamingLLM): recall at depths 25–75 vs 0 and 100",
              ""]
    cells = scores.get(("needle", "256", "streamingllm"))
    if cells:
        middle = [v for (length, depth), v in cells.items() if 0 < depth < 100]
        edges = [v for (length, depth), v in cells.items() if depth in (0, 100)]
        lines.append(f"- streamingllm C=256: middle depths mean recall {_mean(middle)} ({len(middle)} cells), "
                     f"depths 0/100 {_mean(edges)} ({len(edges)} cells)")
        lines.append("- " + compare(scores, "needle", "256", "fullkv", "streamingllm", where=lambda k: 0 < k[1] < 100,
                                    first_budget="full") + " (middle depths only)")
    else:
        lines.append("- not run yet")
    lines += ["", "**4. pyramidkv ≥ snapkv at C=128 on LongBench** (PyramidKV), beside what C=128 costs against fullkv",
              ""]
    lines.append("- " + compare(scores, "longbench", "128", "fullkv", "snapkv"))
    lines.append("- " + compare(scores, "longbench", "128", "pyramidkv", "snapkv"))
    for dataset in ("multi_news", "multifieldqa_zh"):
        lines.append("- " + compare(scores, "longbench", "128", "pyramidkv", "snapkv", where=lambda k, d=dataset: k[0] == d)
                     + f" ({dataset})")
    lines += ["", "**5. LongBench: streamingllm below the selecting methods, and what a larger budget recovers**", ""]
    for budget in ("128", "1024"):
        if budget != "128":  # fullkv's runs sit in the C=128 folder
            lines.append("- " + compare(scores, "longbench", budget, "fullkv", "snapkv", first_budget="128"))
            lines.append("- " + compare(scores, "longbench", budget, "pyramidkv", "snapkv"))
        for first in ("snapkv", "pyramidkv"):
            lines.append("- " + compare(scores, "longbench", budget, first, "streamingllm"))
    return "\n".join(lines) + "\n"


def needle_figures(folders: dict[tuple[str, str], Path], figures: Path) -> list[str]:
    from kvfactory.plots import plot_needle_comparison

    written = []
    main = [folders[key] for key in sorted(folders, key=lambda bm: _order(bm[1]))
            if key[0] in ("full", "256")]
    if main:
        written.append(str(plot_needle_comparison(main, figures / "needle_qwen_c256.png", layout="horizontal")))
    sweep = [folders[key] for key in sorted(folders, key=lambda bm: int(bm[0]) if bm[0].isdigit() else 0)
             if key[1] == "snapkv"]
    if len(sweep) > 1:
        written.append(str(plot_needle_comparison(sweep, figures / "needle_qwen_snapkv_sweep.png", layout="horizontal")))
    return written


def report(root: Path, figures: Path | None, save_scores: bool = False) -> str:
    scores: Scores = {}
    read_passkey(root, scores)
    folders = read_needle(root, scores)
    read_ruler(root, scores)
    read_longbench(root, scores, save_scores)
    parts = [
        grouped_table(scores, "passkey", lambda key: key[:2],
                      "**Passkey** (found / prompts per length and depth; fullkv sits in the C=256 folder):", _found,
                      label=lambda column: f"{column[0]} d{column[1]}"),
        grouped_table(scores, "needle", lambda key: key[0], "**Needle** (mean recall ×100 per context length, "
                      "5 depths each):"),
        grouped_table(scores, "ruler", lambda key: key[1], "**RULER** at 4k (score ×100 per task):"),
        grouped_table(scores, "longbench", lambda key: key[0], "**LongBench** (official metric ×100):"),
        "**Orderings**, paired bootstrap (95%, 10,000 resamples) of the mean difference ×100:\n\n" + orderings(scores),
    ]
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        written = needle_figures(folders, figures)
        parts.append("Figures: " + ", ".join(f"`{path}`" for path in written) + "\n" if written else "")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaign_dir", type=Path, default=Path("benchmarks/results/qwen2.5-coder-0.5b"))
    parser.add_argument("--figures", type=Path, default=None, help="write the needle heatmaps here")
    parser.add_argument("--write", type=Path, default=None, help=f"replace the {BEGIN} … {END} part of this file")
    args = parser.parse_args(argv)
    if not args.campaign_dir.is_dir():
        parser.error(f"no campaign results at {args.campaign_dir} (run scripts/campaign/qwen.sh first)")
    text = report(args.campaign_dir, args.figures, save_scores=args.write is not None)
    if args.write is None:
        print(text)
        return 0
    document = args.write.read_text()
    if BEGIN not in document or END not in document:
        parser.error(f"{args.write} has no {BEGIN} … {END} markers")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    args.write.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", document))
    print(f"-> {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
