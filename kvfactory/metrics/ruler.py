"""RULER scoring (``eval/evaluate.py`` + ``eval/synthetic/constants.py`` @ e40fae1) and a results-folder scorer.

Predictions are cleaned with :func:`postprocess_pred` and matched case-insensitively as substrings: niah, vt, cwe
and fwe use :func:`string_match_all` (the fraction of references found), qa_1/qa_2 :func:`string_match_part` (any
reference found). Scores are ``round(100 * mean, 2)``.

Results layout read by :func:`score_results`: ``{results_dir}/{length}/{task}/{method}.jsonl``, one JSON object per
line with at least ``index``, ``pred`` and ``outputs``. Its command line (which prints :func:`format_table`):
``python run_ruler.py --eval --results_dir DIR``, or ``bash scripts/ruler/metrics.sh DIR``.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from kvfactory.metrics.files import jsonl_lines, merge_metrics_json

__all__ = [
    "postprocess_pred", "string_match_all", "string_match_part", "TASK_METRICS", "metric_for", "score_task",
    "read_predictions", "score_results", "format_table",
]

logger = logging.getLogger(__name__)

Refs = Sequence[Sequence[str]]


def postprocess_pred(prediction: str) -> str:
    """``strip``, control characters (``\\x00``-``\\x1f``) to ``\\n``, ``strip`` again."""
    prediction = prediction.strip()
    prediction = re.sub(r"[\x00-\x1f]", "\n", prediction)
    return prediction.strip()


def _check(preds: Sequence[str], refs: Refs) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError("no predictions to score")


def string_match_all(preds: Sequence[str], refs: Refs) -> float:
    """Mean over samples of the fraction of references contained in the prediction, x100, rounded to 2 places."""
    _check(preds, refs)
    total = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Refs) -> float:
    """Mean over samples of "any reference is contained in the prediction", x100, rounded to 2 places."""
    _check(preds, refs)
    total = sum(max(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


#: Metric of each of RULER's 13 tasks.
TASK_METRICS: dict[str, Callable[[Sequence[str], Refs], float]] = {
    **{task: string_match_all for task in (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")},
    "qa_1": string_match_part,
    "qa_2": string_match_part,
}


def metric_for(task: str) -> Callable[[Sequence[str], Refs], float]:
    """The metric of a task; other names starting with ``qa`` get ``part``, anything else ``all`` (RULER's rule)."""
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    return string_match_part if task.startswith("qa") else string_match_all


def score_task(preds: Sequence[str], refs: Refs, task: str) -> float:
    """Score one task as ``evaluate.py`` does: post-process, then the task's metric.

    Returns 0.0 when the first reference is ``None`` (RULER's guard for unlabelled test sets).
    """
    _check(preds, refs)
    if not refs[0] or refs[0][0] is None:
        return 0.0
    return metric_for(task)([postprocess_pred(p) for p in preds], refs)


def read_predictions(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Predictions and references of one ``{method}.jsonl``, skipping malformed lines with a warning.

    A line is kept when it is a JSON object with an ``index``, a string ``pred`` and a list ``outputs`` (a string
    is wrapped in a list); a repeated ``index`` keeps its first line.
    """
    preds: list[str] = []
    refs: list[list[str]] = []
    seen: set[Any] = set()
    for number, record in jsonl_lines(path):
        try:
            index, pred, outputs = record["index"], record["pred"], record["outputs"]
        except (KeyError, TypeError):
            logger.warning("%s:%d: skipped, needs an object with index, pred and outputs", path, number)
            continue
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(pred, str) or not isinstance(outputs, list) or not outputs or None in outputs:
            logger.warning("%s:%d: skipped, pred must be a string and outputs a non-empty list of answers",
                           path, number)
            continue
        if not isinstance(index, (int, str)) or index in seen:
            logger.warning("%s:%d: skipped, index %r missing or repeated", path, number, index)
            continue
        seen.add(index)
        preds.append(pred)
        refs.append([str(o) for o in outputs])
    return preds, refs


def _task_order(task: str) -> tuple[int, str]:
    order = list(TASK_METRICS)
    return (order.index(task), task) if task in order else (len(order), task)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def score_results(results_dir: str | Path) -> dict[str, dict[str, float]]:
    """Score every ``{length}/{task}/{method}.jsonl`` under ``results_dir``.

    Writes ``{length}/{task}/metrics.json`` (``{method: score}``, merged into what is there) and
    ``{results_dir}/results.csv``: one row per method (``fullkv`` first), columns ``{length}/{task}`` grouped by
    length with a ``{length}/average`` after each group, then ``average`` over every scored cell of the row. Means
    cover the tasks present for that method. Returns ``{method: {column: score}}``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    table: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    lengths = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for length_dir in lengths:
        tasks = sorted((p for p in length_dir.iterdir() if p.is_dir()), key=lambda p: _task_order(p.name))
        for task_dir in tasks:
            scores: dict[str, float] = {}
            for path in sorted(task_dir.glob("*.jsonl")):
                preds, refs = read_predictions(path)
                if not preds:
                    logger.warning("%s: no usable predictions; not scored", path)
                    continue
                scores[path.stem] = score_task(preds, refs, task_dir.name)
            if not scores:
                continue
            merge_metrics_json(task_dir, scores)
            column = f"{length_dir.name}/{task_dir.name}"
            columns.append(column)
            for method, score in scores.items():
                table.setdefault(method, {})[column] = score
        if any(c.startswith(f"{length_dir.name}/") for c in columns):
            columns.append(f"{length_dir.name}/average")
    for row in table.values():
        for length_dir in lengths:
            cells = [v for c, v in row.items() if c.split("/")[0] == length_dir.name and not c.endswith("/average")]
            if cells:
                row[f"{length_dir.name}/average"] = _mean(cells)
        cells = [v for c, v in row.items() if not c.endswith("average")]
        row["average"] = _mean(cells)
    columns.append("average")
    methods = sorted(table, key=lambda m: (m.lower() != "fullkv", m.lower()))
    with open(root / "results.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *columns])
        for method in methods:
            writer.writerow([method, *(table[method].get(c, "") for c in columns)])
    return {method: table[method] for method in methods}


def format_table(scores: dict[str, dict[str, float]], *, seconds: dict[str, float] | None = None) -> str:
    """A Markdown table of :func:`score_results`' output: one row per method, one column per ``{length}/{task}``
    (then the means), and a ``wall s`` column when ``seconds`` (per method) is given."""
    columns: list[str] = []
    for row in scores.values():
        columns.extend(c for c in row if c not in columns)
    columns.sort(key=_column_order)
    header = ["method", *columns] + (["wall s"] if seconds is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in scores.items():
        cells = [method, *(f"{row[c]:.2f}" if c in row else "" for c in columns)]
        if seconds is not None:
            cells.append(f"{seconds[method]:.0f}" if method in seconds else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_order(column: str) -> tuple[int, int, str]:
    """``{length}/{task}`` by length, then RULER's task order, the length's mean last; the overall mean at the end."""
    length, _, task = column.partition("/")
    if not task or not length.isdigit():
        return (1 << 62, 0, column)
    return (int(length), len(TASK_METRICS) + 1, task) if task == "average" else (int(length), *_task_order(task))
