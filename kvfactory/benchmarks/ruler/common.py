"""Pieces shared by the RULER generators: token counting, seeded RNGs, JSONL files, errors.

Token-counting protocol
-----------------------
Length fitting needs one thing from a tokenizer: the number of tokens of a text **without special tokens** (RULER's
``hf`` tokenizer counts ``len(tokenizer.tokenize(text))``). :func:`as_token_counter` accepts, in this order:

1. an object with a callable ``count_tokens(text) -> int`` attribute (any custom tokenizer);
2. a Hugging Face tokenizer (has ``tokenize`` and ``encode``): ``len(tokenizer.tokenize(text))``, exactly as RULER;
3. any object with ``encode(text, add_special_tokens=False) -> sequence``: ``len(encode(...))``;
4. a plain callable ``f(text) -> int``.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "MissingTaskData", "TokenCounter", "as_token_counter", "Rngs", "write_jsonl", "read_jsonl",
    "remove_newline_tab", "SampleDoesNotFit",
]

logger = logging.getLogger(__name__)


class MissingTaskData(RuntimeError):
    """A task needs data that was not given or not found (essays, SQuAD, HotpotQA); a runner may skip the task."""


class SampleDoesNotFit(RuntimeError):
    """No haystack size fits ``max_seq_length`` (upstream RULER loops forever in that case)."""


@runtime_checkable
class TokenCounter(Protocol):
    """Anything with ``count_tokens(text) -> int`` (special tokens excluded)."""

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text``, without BOS/EOS or other special tokens."""


def as_token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A function ``text -> number of tokens`` for any accepted tokenizer (see the module docstring).

    Raises
    ------
    TypeError
        When ``tokenizer`` matches none of the accepted shapes.
    """
    count = getattr(tokenizer, "count_tokens", None)
    if callable(count):
        return lambda text: int(count(text))
    if callable(getattr(tokenizer, "tokenize", None)) and callable(getattr(tokenizer, "encode", None)):
        return lambda text: len(tokenizer.tokenize(text))
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        return lambda text: len(encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return lambda text: int(tokenizer(text))
    raise TypeError(
        f"cannot count tokens with {type(tokenizer).__name__}: pass an object with count_tokens(text), a Hugging "
        "Face tokenizer, an object with encode(text, add_special_tokens=False), or a callable text -> int"
    )


@dataclass
class Rngs:
    """The two RNG streams of a RULER generator script, seeded as the script seeds its globals.

    ``py`` replaces the global ``random`` module and ``numpy`` the global ``numpy.random``: a private
    ``random.Random(seed)`` draws exactly what ``random.seed(seed)`` followed by module-level calls draws, and
    ``numpy.random.RandomState(seed)`` exactly what ``np.random.seed(seed)`` does, so outputs are identical to
    RULER's while the caller's global RNG state is never touched.
    """

    seed: int
    py: random.Random = field(init=False)
    numpy: np.random.RandomState = field(init=False)

    def __post_init__(self) -> None:
        self.py = random.Random(self.seed)
        self.numpy = np.random.RandomState(self.seed)

    def fresh(self) -> random.Random:
        """A new ``random.Random(seed)``, as RULER's ``random.Random(args.random_seed).shuffle(...)``."""
        return random.Random(self.seed)


def remove_newline_tab(text: str) -> str:
    """RULER's ``--remove_newline_tab``: newlines/tabs to spaces, then whitespace runs collapsed."""
    return " ".join(text.replace("\n", " ").replace("\t", " ").strip().split())


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as RULER does (nemo ``write_manifest``: ``json.dump`` with ASCII escapes, one per line).

    Creates parent folders; the file is replaced atomically (a killed run leaves the old file or the new one).
    Returns the path written.
    """
    from kvfactory.benchmarks.locking import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def read_jsonl(path: str | Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """Read a JSONL file (blank lines ignored).

    Parameters
    ----------
    path : str or Path
        The file.
    strict : bool
        If true, a malformed line (bad JSON or not an object) raises ``ValueError`` naming the line; if false, it
        is skipped with a logged warning.
    """
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problem = f"{path}:{number}: not valid JSON ({error.msg})"
            else:
                if isinstance(record, dict):
                    records.append(record)
                    continue
                problem = f"{path}:{number}: a JSON {type(record).__name__}, not an object"
            if strict:
                raise ValueError(problem)
            logger.warning("skipping malformed line %s", problem)
    return records
