"""Needle-in-a-haystack, model-free, part 3 of 3: scoring an answer and the result file of each cell.

Holds the scores (:func:`needle_recall`, :func:`rouge1_f`, both in :func:`score_answer`) and the per-cell records
(:func:`write_cell`, :func:`read_cells`, :func:`completed_cells`, :data:`CELL_FIELDS`). The haystack and the needle
are in :mod:`kvfactory.benchmarks.needle_haystack` (whose docstring describes the protocol followed), the prompt in
:mod:`kvfactory.benchmarks.needle_prompt`, the heatmaps drawn from the cells in :mod:`kvfactory.plots`.

Kept
    ROUGE-1 F as ``rouge-score`` 0.1.2 computes it.

Differs
    - **Scoring** is deterministic and offline (gkamradt's GPT judge cannot run offline): :func:`needle_recall`
      (KVCF ``visualize.py``'s keyword recall, made robust: punctuation stripped, stop words dropped, stemmed, and
      the question's own words excluded so parroting the question earns nothing) and :func:`rouge1_f` (KVCF's stored
      score, divided by 10). Both lie in [0, 1].
    - **Results**: one JSON per (length, depth) cell in a run folder (:func:`write_cell`), written atomically; the
      folder, not the file name, carries model/method/budget.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kvfactory.benchmarks.needle_haystack import NEEDLE
from kvfactory.benchmarks.needle_prompt import RETRIEVAL_QUESTION

__all__ = [
    "STOP_WORDS", "key_words", "needle_recall", "rouge1_f", "rouge_tokens", "score_answer",
    "CELL_FIELDS", "cell_filename", "write_cell", "read_cells", "completed_cells",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- scoring
STOP_WORDS: frozenset[str] = frozenset(
    "a an the and or but if of in on at to for from by with into onto about as is are was were be been being am "
    "do does did done it its this that these those there here what which who whom whose when where why how".split()
)
"""Words :func:`needle_recall` ignores (compared before stemming): articles, common prepositions and conjunctions,
forms of *be* and *do*, pronoun-like determiners, question words."""


@functools.lru_cache(maxsize=1)
def _porter() -> Any:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _porter().stem(word)


def _words(text: str) -> list[str]:
    return [word for word in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if word]


def key_words(text: str, *, exclude: str | None = None) -> set[str]:
    """The Porter stems of ``text``'s words that are not stop words (nor words of ``exclude``)."""
    excluded = {_stem(word) for word in _words(exclude)} if exclude else set()
    return {_stem(word) for word in _words(text) if word not in STOP_WORDS} - excluded


def needle_recall(answer: str, needle: str = NEEDLE, *, question: str | None = None) -> float:
    """Fraction of the needle's key words found in the answer, in [0, 1].

    Both texts are lower-cased, every run of non-alphanumerics becomes a space, :data:`STOP_WORDS` are dropped from
    the needle, and words are compared by Porter stem (``sitting`` finds ``sit``). With ``question``, the question's
    words are removed from the needle's key words, so an answer that only echoes the question scores 0: for the
    classic needle and question the key words are eat, sandwich, sit, dolores, park, sunny, day (7); without it,
    also best, thing, san, francisco (11). KVCF's ``visualize.py`` splits on whitespace only, so ``day`` without the
    period misses there; here it matches.
    """
    keys = key_words(needle, exclude=question)
    if not keys:
        keys = key_words(needle)
    if not keys:
        raise ValueError(f"the needle {needle!r} has no key words")
    found = {_stem(word) for word in _words(answer)}
    return len(keys & found) / len(keys)


def rouge_tokens(text: str) -> list[str]:
    """``rouge-score`` 0.1.2's tokenizer with ``use_stemmer=True``: lowercase, ``[^a-z0-9]+`` → space, split,
    Porter-stem tokens longer than 3 characters."""
    return [_stem(token) if len(token) > 3 else token for token in _words(text)]


def rouge1_f(answer: str, needle: str = NEEDLE) -> float:
    """ROUGE-1 F-measure of ``answer`` against ``needle``, as ``rouge_scorer.RougeScorer(['rouge1'],
    use_stemmer=True).score(needle, answer)['rouge1'].fmeasure`` gives it (KVCF stores 10× this).

    Unigram counts are intersected (``sum(min)``); P = overlap / #answer, R = overlap / #needle, F = 2PR / (P + R),
    0 when either side is empty or nothing overlaps.
    """
    target, prediction = Counter(rouge_tokens(needle)), Counter(rouge_tokens(answer))
    overlap = sum((target & prediction).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(prediction.values())
    recall = overlap / sum(target.values())
    return 2 * precision * recall / (precision + recall)


def score_answer(answer: str, needle: str = NEEDLE, question: str | None = RETRIEVAL_QUESTION) -> dict[str, float]:
    """``{"recall": needle_recall(answer, needle, question=question), "rouge1_f": rouge1_f(answer, needle)}``."""
    return {"recall": needle_recall(answer, needle, question=question), "rouge1_f": rouge1_f(answer, needle)}


# ---------------------------------------------------------------------------------------------------------- results
def _depth_code(depth_percent: float) -> int:
    return int(round(float(depth_percent) * 100))


def cell_filename(context_length: int, depth_percent: float) -> str:
    """``len_{L}_depth_{round(depth*100)}_results.json`` (upstream's suffix; depth 50 → ``depth_5000``)."""
    return f"len_{int(context_length)}_depth_{_depth_code(depth_percent)}_results.json"


CELL_FIELDS = ("model", "method", "budget", "context_length", "depth_percent", "needle", "answer", "recall",
               "rouge1_f", "kept_tokens", "seconds")


def write_cell(results_dir: str | Path, *, model: str, method: str, budget: int | str | None, context_length: int,
               depth_percent: float, needle: str, answer: str, recall: float, rouge1_f: float,
               kept_tokens: float | None, seconds: float, extra: Mapping[str, Any] | None = None) -> Path:
    """Write one cell's record as ``results_dir / cell_filename(L, d)`` (atomically: temp file, then rename).

    The temporary file is unique per process (``.{name}.{pid}.tmp``), so concurrent writers never share one.
    ``extra`` entries (e.g. ``insertion_index``, ``question``, ``prompt_tokens``) are stored beside the standard
    fields (:data:`CELL_FIELDS`) and may not override them; ``timestamp_utc`` is added.
    """
    record: dict[str, Any] = {
        "model": model, "method": method, "budget": budget, "context_length": int(context_length),
        "depth_percent": float(depth_percent), "needle": needle, "answer": answer, "recall": float(recall),
        "rouge1_f": float(rouge1_f), "kept_tokens": None if kept_tokens is None else float(kept_tokens),
        "seconds": float(seconds),
    }
    clash = sorted(set(extra or {}) & set(record))
    if clash:
        raise ValueError(f"extra may not override the standard fields {clash}")
    record.update(extra or {})
    record["timestamp_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / cell_filename(context_length, depth_percent)
    from kvfactory.benchmarks.locking import atomic_write_text

    return atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a needle result")


def read_cells(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every cell record in ``results_dir`` (``*_results.json``), sorted by (context_length, depth_percent).

    Unreadable files and files without ``context_length``/``depth_percent`` are skipped with a warning.

    Raises
    ------
    FileNotFoundError
        When ``results_dir`` does not exist.
    """
    folder = Path(results_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no needle results folder {folder}")
    cells = []
    for path in sorted(folder.glob("*_results.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable needle result %s: %s", path, error)
            continue
        if not isinstance(record, dict) or "context_length" not in record or "depth_percent" not in record:
            logger.warning("skipping %s: not a needle cell record", path)
            continue
        cells.append(record)
    cells.sort(key=lambda record: (int(record["context_length"]), float(record["depth_percent"])))
    return cells


def completed_cells(results_dir: str | Path, **expected: Any) -> set[tuple[int, float]]:
    """``{(context_length, depth_percent)}`` already written in ``results_dir`` (empty if the folder is absent).

    Keyword arguments (e.g. ``model="smollm2-135m", method="snapkv", budget=128``) must match every record: a folder
    holding another run's cells raises ``ValueError`` instead of silently resuming on top of it.
    """
    if not Path(results_dir).is_dir():
        return set()
    done = set()
    for record in read_cells(results_dir):
        for key, value in expected.items():
            if key in record and record[key] != value:
                raise ValueError(f"{results_dir} holds a cell (len {record['context_length']}, depth "
                                 f"{record['depth_percent']}) with {key}={record[key]!r}, not {value!r}: "
                                 f"use one results folder per model, method and budget")
        done.add((int(record["context_length"]), float(record["depth_percent"])))
    return done
