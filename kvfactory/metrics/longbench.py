"""LongBench v1 scoring: the official metric functions (``LongBench/metrics.py``) and ``eval.py``'s scorers, with the
official packages (``rouge`` 1.0.1, ``jieba`` 0.42.1, ``fuzzywuzzy`` 0.18.0 **without** python-Levenshtein).

Every quirk that moves published numbers is kept on purpose (see ``docs/longbench.md``):

- ``rouge_score`` is ROUGE-L F of the ``rouge`` package: case-sensitive, set semantics, identical texts give
  0.999999995, and *any* exception (empty text, ``RecursionError`` on very long period-free sentences) scores 0.0;
- ``classification_score`` removes matches while iterating over them (the element after a removal is skipped);
- ``code_sim_score`` uses fuzzywuzzy's difflib path (LongBench's own requirements), not Levenshtein;
- trec, triviaqa, samsum and lsht are scored on the first line of the prediction after leading newlines;
- a sample scores the max over its reference answers; a dataset scores ``round(100 * mean, 2)``; LongBench-E
  splits bucket samples by their ``length`` field (words or characters, not tokens) into 0-4k / 4-8k / 8k+.

Results layout read by :func:`score_results`: ``{results_dir}/{dataset}/{method}.jsonl`` (``{dataset}`` is one of
the 21 tasks, or ``{task}_e`` for a LongBench-E split), one JSON object per line with ``_id``, ``pred``, ``answers``,
``all_classes`` and ``length``.
"""
from __future__ import annotations

import csv
import logging
import math
import re
import string
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import jieba
from rouge import Rouge

from kvfactory.metrics.files import jsonl_lines, merge_metrics_json

with warnings.catch_warnings():  # "slow pure-python SequenceMatcher": the difflib path is the chosen one
    warnings.simplefilter("ignore", UserWarning)
    from fuzzywuzzy import fuzz

__all__ = [
    "normalize_answer", "normalize_zh_answer", "f1_score", "qa_f1_score", "qa_f1_zh_score", "rouge_score",
    "rouge_zh_score", "classification_score", "retrieval_score", "retrieval_zh_score", "count_score",
    "code_sim_score", "DATASET2METRIC", "FIRST_LINE_DATASETS", "E_BUCKETS", "scorer", "scorer_e", "base_dataset",
    "read_predictions", "score_results",
]

logger = logging.getLogger(__name__)
jieba.setLogLevel(logging.WARNING)

#: Chinese punctuation removed by ``normalize_zh_answer`` (LongBench's set; it ends with an ASCII ".").
ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ZH_EXCLUDED = frozenset(string.punctuation + ZH_PUNCTUATION)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (in this order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, drop all whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ZH_EXCLUDED)
    return "".join(s.split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str], **_: Any) -> float:
    """Token F1 over multisets; an empty overlap returns the int ``0`` (as upstream)."""
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """F1 of the normalized whitespace tokens (English QA)."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    tokens = (normalize_zh_answer(token) for token in jieba.cut(text, cut_all=False))
    return [token for token in tokens if len(token) > 0]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """F1 of jieba words (precise mode), each normalized, empty ones dropped (Chinese QA)."""
    return f1_score(_zh_tokens(prediction), _zh_tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of ``rouge.Rouge`` (defaults); any exception scores 0.0, as LongBench's bare ``except``."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - the official scorer turns every failure (incl. RecursionError) into 0.0
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """``rouge_score`` on jieba words joined by spaces."""
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return rouge_score(prediction, ground_truth)


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """``1/len(matches)`` if the true class is among the class names found in the prediction, else 0.

    Matches that are substrings of a different ground truth are removed while iterating over the list, so the
    element after each removal is skipped: this is the official behaviour and it is kept.
    """
    all_classes = kwargs.get("all_classes")
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the dataset's class names)")
    em_match_list = [class_name for class_name in all_classes if class_name in prediction]
    for match_term in em_match_list:  # mutating while iterating, on purpose (upstream parity)
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    return 1.0 / len(em_match_list) if ground_truth in em_match_list else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(str(number) == str(target) for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the paragraph id of ``"Paragraph N"`` (IndexError if none)."""
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """As :func:`retrieval_score` with the ground truth ``"段落N"``."""
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the ground-truth count."""
    return _number_share(prediction, ground_truth)


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """``fuzz.ratio / 100`` of the first prediction line without `` ` ``, ``#`` or ``//`` and the raw ground truth."""
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz.ratio(first, ground_truth) / 100


Metric = Callable[..., float]

#: The metric of each of the 21 LongBench v1 tasks (``eval.py:dataset2metric``), in the official order.
DATASET2METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_count": count_score, "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
#: Tasks whose prediction is cut to its first line before scoring.
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")
#: LongBench-E buckets, by the record's ``length`` (upper bounds, exclusive).
E_BUCKETS = (("0-4k", 4000), ("4-8k", 8000), ("8k+", math.inf))


def base_dataset(name: str) -> tuple[str, bool]:
    """``("qasper", True)`` for ``"qasper_e"``; raises for a name that is not a LongBench task."""
    base, is_e = (name[:-2], True) if name.endswith("_e") else (name, False)
    if base not in DATASET2METRIC:
        raise ValueError(f"{name!r} is not a LongBench dataset; known: {', '.join(DATASET2METRIC)} "
                         f"(and <name>_e for LongBench-E)")
    return base, is_e


def _sample_score(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None) -> float:
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET2METRIC[dataset]
    score = 0.0
    for ground_truth in answers:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score


def _check(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")


def scorer(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
           all_classes: Sequence[str] | None) -> float:
    """``eval.py:scorer``: ``round(100 * mean over samples of max over answers, 2)``."""
    dataset, _ = base_dataset(dataset)
    _check(predictions, answers)
    total = sum(_sample_score(dataset, p, a, all_classes) for p, a in zip(predictions, answers))
    return round(100 * total / len(predictions), 2)


def scorer_e(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], lengths: Sequence[int],
             all_classes: Sequence[str] | None) -> dict[str, float]:
    """``eval.py:scorer_e``: the same per-sample scores averaged per length bucket; an empty bucket is NaN."""
    dataset, _ = base_dataset(dataset)
    _check(predictions, answers)
    if len(lengths) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(lengths)} lengths")
    buckets: dict[str, list[float]] = {name: [] for name, _ in E_BUCKETS}
    for prediction, truths, length in zip(predictions, answers, lengths):
        name = next(name for name, bound in E_BUCKETS if length < bound)
        buckets[name].append(_sample_score(dataset, prediction, truths, all_classes))
    return {name: round(100 * sum(v) / len(v), 2) if v else math.nan for name, v in buckets.items()}


REQUIRED_FIELDS = ("_id", "pred", "answers", "length")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The usable records of one ``{method}.jsonl``: malformed lines are skipped with a warning and a repeated
    ``_id`` keeps its first line (a file appended to twice by another tool is not double-counted)."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, record in jsonl_lines(path):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            logger.warning("%s:%d: skipped, missing %s", path, number, ", ".join(missing))
            continue
        if not isinstance(record["pred"], str) or not isinstance(record["answers"], list):
            logger.warning("%s:%d: skipped, pred must be a string and answers a list", path, number)
            continue
        if record["_id"] in seen:
            logger.warning("%s:%d: skipped, _id %s repeated", path, number, record["_id"])
            continue
        seen.add(record["_id"])
        records.append(record)
    return records


def score_file(path: str | Path, dataset: str) -> float | dict[str, float]:
    """The score of one results file: a number, or the E buckets for a ``{task}_e`` dataset."""
    records = read_predictions(path)
    if not records:
        raise ValueError(f"{path}: no usable predictions")
    predictions = [r["pred"] for r in records]
    answers = [r["answers"] for r in records]
    all_classes = next((r["all_classes"] for r in records if r.get("all_classes")), None)
    if base_dataset(dataset)[1]:
        return scorer_e(dataset, predictions, answers, [r["length"] for r in records], all_classes)
    return scorer(dataset, predictions, answers, all_classes)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_metrics(folder: Path, scores: dict[str, Any]) -> None:
    """``metrics.json`` of one dataset folder: ``{method: score}``, merged into what is there."""
    merge_metrics_json(folder, _json_safe(scores), indent=4)


def _dataset_order(name: str) -> tuple[int, int]:
    base, is_e = base_dataset(name)
    return int(is_e), list(DATASET2METRIC).index(base)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return round(sum(values) / len(values), 2) if values else None


def score_results(results_dir: str | Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Score every ``{dataset}/{method}.jsonl`` under ``results_dir``.

    Writes ``{dataset}/metrics.json`` per dataset and ``{results_dir}/results.csv``: one row per method (``fullkv``
    first, then alphabetical), one column per dataset in the official order (LongBench-E splits get one column per
    bucket, ``{task}_e/0-4k`` ...), then ``average`` (mean over the row's non-E datasets), ``average_e/<bucket>``
    (mean over its E splits, NaN buckets skipped) and ``datasets`` (how many datasets the row has: averages of rows
    with different counts are not comparable). Empty cells are missing results. Returns ``(columns, rows)``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    dataset_dirs = sorted((p for p in root.iterdir() if p.is_dir() and any(p.glob("*.jsonl"))),
                          key=lambda p: _dataset_order(p.name))
    if not dataset_dirs:
        raise FileNotFoundError(f"no {{dataset}}/{{method}}.jsonl files under {root}")
    table: dict[str, dict[str, Any]] = {}
    columns: list[str] = []
    plain_columns: list[str] = []
    bucket_columns: dict[str, list[str]] = {name: [] for name, _ in E_BUCKETS}
    for folder in dataset_dirs:
        scores: dict[str, Any] = {}
        for path in sorted(folder.glob("*.jsonl")):
            try:
                scores[path.stem] = score_file(path, folder.name)
            except ValueError as error:
                logger.warning("%s; not scored", error)
        if not scores:
            continue
        _write_metrics(folder, scores)
        if base_dataset(folder.name)[1]:
            names = [f"{folder.name}/{bucket}" for bucket, _ in E_BUCKETS]
            for (bucket, _), column in zip(E_BUCKETS, names):
                bucket_columns[bucket].append(column)
            for method, buckets in scores.items():
                table.setdefault(method, {}).update(dict(zip(names, buckets.values())))
        else:
            names = [folder.name]
            plain_columns.append(folder.name)
            for method, score in scores.items():
                table.setdefault(method, {})[folder.name] = score
        columns.extend(names)
    summary = (["average"] if plain_columns else []) + [f"average_e/{b}" for b, c in bucket_columns.items() if c]
    for row in table.values():
        if plain_columns:
            row["average"] = _mean([row[c] for c in plain_columns if c in row])
        for bucket, names in bucket_columns.items():
            if names:
                row[f"average_e/{bucket}"] = _mean([row[c] for c in names if c in row])
        row["datasets"] = len({c.split("/")[0] for c in row if c in columns})
    columns = columns + summary + ["datasets"]
    methods = sorted(table, key=lambda m: (m.lower() != "fullkv", m.lower()))
    with open(root / "results.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *columns])
        for method in methods:
            writer.writerow([method, *(_csv_cell(table[method].get(c)) for c in columns)])
    return columns, {method: table[method] for method in methods}


def _csv_cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
