"""Needle-in-a-haystack runner: drives a (patched) model over the (context length × depth) grid.

The protocol itself lives in :mod:`kvfactory.benchmarks.needle_haystack` (haystack, sentence-boundary insertion),
:mod:`kvfactory.benchmarks.needle_prompt` (exact-length prompts) and :mod:`kvfactory.benchmarks.needle_scoring`
(scoring, one JSON per cell); the figures in :mod:`kvfactory.plots`. This module adds the grid,
the jobs (one greedy answer per cell, through :func:`kvfactory.benchmarks.common.run_jobs`, so batching, tqdm,
kept tokens and seconds are the same as in every other runner), resuming and a text summary. ``run_needle.py`` is
its command line.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kvfactory.benchmarks.common import Job, run_jobs
from kvfactory.benchmarks.needle_haystack import (NEEDLE, build_context, load_haystack_text, noise_haystack,
                                                  sentence_end_token_ids)
from kvfactory.benchmarks.needle_prompt import RETRIEVAL_QUESTION, prompt_parts
from kvfactory.benchmarks.needle_scoring import completed_cells, score_answer, write_cell

__all__ = [
    "HAYSTACK_KINDS", "context_lengths", "depth_grid", "haystack_ids", "NeedleRun", "CellStore", "cell_key",
    "needle_jobs", "run_needle", "grid_summary", "format_summary",
]

logger = logging.getLogger(__name__)

HAYSTACK_KINDS = ("essays", "noise")
"""``essays``: the ``*.txt`` files of a folder (the Paul Graham essays); ``noise``: a repeated neutral sentence."""


# ------------------------------------------------------------------------------------------------------------- grid
def context_lengths(s_len: int, e_len: int, step: int) -> list[int]:
    """KVCache-Factory's lengths: ``np.arange(s_len, e_len + 1, step)`` (so ``e_len`` is included when on the step).

    Raises
    ------
    ValueError
        When a bound is not positive, ``step < 1`` or ``s_len > e_len``.
    """
    if s_len < 1 or e_len < 1 or step < 1:
        raise ValueError(f"--s_len, --e_len and --step must be positive integers, got {s_len}, {e_len}, {step}")
    if s_len > e_len:
        raise ValueError(f"--s_len ({s_len}) is larger than --e_len ({e_len})")
    return [int(length) for length in np.arange(s_len, e_len + 1, step)]


def depth_grid(count: int) -> list[float]:
    """``count`` depths evenly spaced over 0–100 and rounded as upstream (10 → 0, 11, 22, ..., 100)."""
    if count < 1:
        raise ValueError(f"the number of depths must be at least 1, got {count}")
    if count == 1:
        return [50.0]
    return [float(depth) for depth in np.round(np.linspace(0, 100, count))]


def haystack_ids(tokenizer: Any, kind: str = "essays", haystack_dir: str | Path | None = None, *,
                 min_tokens: int) -> list[int]:
    """The haystack as token ids, at least ``min_tokens`` of them (essays repeated in whole passes when short).

    Parameters
    ----------
    kind
        One of :data:`HAYSTACK_KINDS`.
    haystack_dir
        Essay folder for ``essays``; ``None`` uses :func:`~kvfactory.benchmarks.needle_haystack.default_haystack_dir`.
        Must be None for ``noise``.

    Raises
    ------
    kvfactory.benchmarks.needle_haystack.HaystackNotFound
        When no essay folder is found (the message names the flags that fix it).
    """
    if kind not in HAYSTACK_KINDS:
        raise ValueError(f"unknown haystack {kind!r}; accepted: {', '.join(HAYSTACK_KINDS)}")
    if kind == "noise" and haystack_dir is not None:
        raise ValueError("--haystack_dir is for --haystack essays; --haystack noise needs no files")
    with _quiet_length_warning():
        if kind == "noise":
            text = noise_haystack(min_tokens=min_tokens, tokenizer=tokenizer)
        else:
            text = load_haystack_text(haystack_dir, min_tokens=min_tokens, tokenizer=tokenizer)
        return list(tokenizer.encode(text, add_special_tokens=False))


@contextlib.contextmanager
def _quiet_length_warning() -> Iterator[None]:
    """Silence transformers' "sequence length is longer than the maximum" warning: the whole haystack is encoded
    once, and every prompt cut from it is trimmed to its context length."""
    hf_logger = logging.getLogger("transformers.tokenization_utils_base")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


# -------------------------------------------------------------------------------------------------------- the run
@dataclass
class NeedleRun:
    """One needle run: the grid, the texts, and the labels stored in (and checked against) every cell.

    Attributes
    ----------
    results_dir
        The run folder: one ``len_{L}_depth_{d*100}_results.json`` per cell, ``run_meta.json``, the heatmap.
    model, method, budget
        Labels of the run (``budget`` None for the full cache); a folder holding cells with other labels is refused.
    version
        The run's name (``--model_version``), stored in each cell.
    haystack
        What the haystack was (``essays:{folder}`` or ``noise``), stored in each cell.
    """

    results_dir: Path
    lengths: list[int]
    depths: list[float]
    model: str
    method: str
    budget: int | str | None
    version: str
    needle: str = NEEDLE
    question: str = RETRIEVAL_QUESTION
    answer_prefix: str = ""
    max_new_tokens: int = 50
    use_chat_template: bool = True
    haystack: str = "essays"
    cells: list[tuple[int, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        if not self.lengths or not self.depths:
            raise ValueError("a needle run needs at least one context length and one depth")
        bad = [depth for depth in self.depths if not 0.0 <= float(depth) <= 100.0]
        if bad:
            raise ValueError(f"depths must lie in [0, 100], got {bad}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        self.lengths = sorted({int(length) for length in self.lengths})
        self.depths = sorted({float(depth) for depth in self.depths})
        self.cells = [(length, depth) for length in self.lengths for depth in self.depths]  # length-major


def cell_key(context_length: int, depth_percent: float) -> str:
    """The job key of a cell: ``"{L}@{depth:g}"``."""
    return f"{int(context_length)}@{float(depth_percent):g}"


class CellStore:
    """The results store :func:`~kvfactory.benchmarks.common.run_jobs` writes into, one JSON file per cell.

    It has the part of :class:`~kvfactory.benchmarks.common.ResultsFile`'s interface ``run_jobs`` uses (``path``,
    ``done``, ``append``): ``append`` scores the answer (recall and ROUGE-1 F) and writes the cell with
    :func:`~kvfactory.benchmarks.needle_scoring.write_cell`. Cells already in the folder count as done, after their
    model/method/budget are checked against the run's.
    """

    def __init__(self, run: NeedleRun) -> None:
        from kvfactory.benchmarks.locking import FileLock, remove_stale_temporaries

        self.run = run
        self.path = run.results_dir
        self.lock = FileLock(run.results_dir / ".cells.lock")
        self._done: set[str] = set()
        with self.lock:
            remove_stale_temporaries(run.results_dir)
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        done = completed_cells(self.run.results_dir, model=self.run.model, method=self.run.method,
                               budget=self.run.budget, answer_prefix=self.run.answer_prefix)
        self._done |= {cell_key(length, depth) for length, depth in done}

    def refresh(self) -> None:
        """Take in the cells other processes wrote meanwhile."""
        with self.lock:
            self._refresh_locked()

    @property
    def done_keys(self) -> set[str]:
        """Keys (:func:`cell_key`) of the cells already written."""
        return set(self._done)

    def done(self, key: str) -> bool:
        return key in self._done

    def append(self, record: dict[str, Any]) -> bool:
        """Score and write one cell unless another run wrote it meanwhile; returns whether it was written."""
        with self.lock:
            self._refresh_locked()
            if record["cell"] in self._done:
                logger.info("%s: cell %s was already written by another run", self.path, record["cell"])
                return False
            self._write(record)
        return True

    def _write(self, record: dict[str, Any]) -> None:
        record = dict(record)
        key = record.pop("cell")
        answer = str(record.pop("pred")).strip()
        length, depth = record.pop("context_length"), record.pop("depth_percent")
        kept, seconds = record.pop("kept_tokens"), record.pop("seconds")
        scores = score_answer(answer, self.run.needle, self.run.question)
        write_cell(
            self.run.results_dir, model=self.run.model, method=self.run.method, budget=self.run.budget,
            context_length=length, depth_percent=depth, needle=self.run.needle, answer=answer, kept_tokens=kept,
            seconds=seconds, extra=record, **scores)
        self._done.add(key)


def needle_jobs(tokenizer: Any, run: NeedleRun, haystack: Sequence[int], stop_token_ids: Sequence[int],
                skip: set[str] = frozenset()) -> list[Job]:
    """One job per cell of ``run`` whose key is not in ``skip``: the prompt ids (exactly ``context_length`` tokens,
    the needle at the depth, on a sentence boundary) and what the cell stores besides the answer.

    Raises
    ------
    ValueError
        When a length is too small for the prompt and needle, or the haystack is too short.
    """
    parts = prompt_parts(tokenizer, run.question, use_chat_template=run.use_chat_template,
                         answer_prefix=run.answer_prefix)
    ends = sentence_end_token_ids(tokenizer)
    jobs = []
    for length, depth in run.cells:
        key = cell_key(length, depth)
        if key in skip:
            continue
        context = build_context(tokenizer, haystack, run.needle, depth, length, parts.overhead, sentence_ends=ends)
        prompt = parts.assemble(context.ids)
        if len(prompt) != length:  # build_context's contract; a broken tokenizer wrapper would show here
            raise RuntimeError(f"the prompt for length {length} has {len(prompt)} tokens")
        jobs.append(Job(key=key, input_ids=prompt, max_new_tokens=run.max_new_tokens,
                        stop_token_ids=list(stop_token_ids),
                        record={"context_length": length, "depth_percent": depth, "version": run.version,
                                "question": run.question, "answer_prefix": run.answer_prefix,
                                "haystack": run.haystack,
                                "chat_template": parts.chat_template, "insertion_index": context.insertion_index,
                                "actual_depth_percent": round(context.actual_depth_percent, 3)}))
    return jobs


def run_needle(model: Any, tokenizer: Any, handle: Any, run: NeedleRun, haystack: Sequence[int], *,
               stop_token_ids: Sequence[int], batch_size: int = 1) -> int:
    """Answer every cell of ``run`` not yet in its folder (greedy) and write one JSON per cell; returns how many ran.

    Jobs go length-major, so a batch of ``batch_size`` cells shares one prompt length (no padding) whenever
    ``batch_size`` divides the number of depths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    store = CellStore(run)
    done_here = sum(cell_key(length, depth) in store.done_keys for length, depth in run.cells)
    if done_here:  # the folder may also hold other lengths' cells (one folder per method and budget)
        logger.info("%s: %d of %d cells already done, resuming", run.results_dir, done_here, len(run.cells))
    jobs = needle_jobs(tokenizer, run, haystack, stop_token_ids, skip=store.done_keys)
    return run_jobs(model, tokenizer, handle, jobs, store, batch_size=batch_size, key_field="cell",
                    description=f"needle {run.version}")


# --------------------------------------------------------------------------------------------------------- summary
def grid_summary(grid: Any) -> dict[str, Any]:
    """Means of a :class:`kvfactory.plots.NeedleGrid`: overall, per depth and per length (NaN cells left out)."""
    def means(axis: int) -> list[float | None]:
        out = []
        for values in np.moveaxis(grid.values, axis, 0):
            finite = values[np.isfinite(values)]
            out.append(round(float(finite.mean()), 4) if finite.size else None)
        return out

    return {"model": grid.model, "method": grid.method, "budget": grid.budget, "metric": grid.metric,
            "mean": None if math.isnan(grid.mean) else round(grid.mean, 4), "missing": grid.missing,
            "depths": grid.depths, "lengths": grid.lengths,
            "per_depth": means(0), "per_length": means(1)}


def format_summary(grid: Any) -> str:
    """A text table of a grid: one row per depth (its cells, then the depth's mean), a row of length means, and the
    overall mean; missing cells print as ``-``."""
    summary = grid_summary(grid)

    def cell(value: float | None) -> str:
        return "     -" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"

    header = "depth % | " + " ".join(f"{length:>6d}" for length in grid.lengths) + " |   mean"
    lines = [f"{grid.model}, {grid.method}, budget {grid.budget}: mean {grid.metric} "
             f"{cell(summary['mean']).strip()} over {grid.values.size - grid.missing} cells", header,
             "-" * len(header)]
    for depth, row, mean in zip(grid.depths, grid.values, summary["per_depth"]):
        lines.append(f"{depth:>7g} | " + " ".join(cell(float(v)) for v in row) + f" | {cell(mean)}")
    lines.append("-" * len(header))
    lines.append("   mean | " + " ".join(cell(v) for v in summary["per_length"]) + f" | {cell(summary['mean'])}")
    return "\n".join(lines)
