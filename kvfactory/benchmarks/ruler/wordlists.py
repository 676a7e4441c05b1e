"""RULER's word lists, read from the ``wonderwords`` package (RULER used 2.2.0).

wonderwords 3.x drops four nouns (abortion, brocolli, idiot, pray): the lists, and so every sampled key, differ.
A warning is logged when the lists are read from another version than 2.2.0.
"""
from __future__ import annotations

import bisect
import functools
import importlib.metadata
import importlib.util
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import overload

__all__ = ["wonderwords_list", "adjective_noun_words", "common_words_vocabulary", "AdjectiveNounWords"]

logger = logging.getLogger(__name__)
RULER_WONDERWORDS = "2.2.0"


@functools.lru_cache(maxsize=None)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One wonderwords list (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``), lines right-stripped.

    Reads the package's ``assets/{name}`` as ``random_word._get_words_from_text_file`` does (UTF-8 text,
    ``readlines``, ``rstrip``), without importing ``random_word`` (whose import leaks open files and warns).
    """
    spec = importlib.util.find_spec("wonderwords")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"RULER word lists need wonderwords=={RULER_WONDERWORDS} (pip install)")
    version = importlib.metadata.version("wonderwords")
    asset = Path(list(spec.submodule_search_locations)[0]) / "assets" / name
    if version != RULER_WONDERWORDS:
        logger.warning("wonderwords %s installed; RULER used %s, so sampled words differ from upstream",
                       version, RULER_WONDERWORDS)
    if asset.is_file():
        with open(asset, encoding="utf-8") as handle:
            return tuple(line.rstrip() for line in handle.readlines())
    with warnings.catch_warnings():  # another layout: use the package's own reader
        warnings.simplefilter("ignore", DeprecationWarning)
        from wonderwords import random_word

        return tuple(random_word._get_words_from_text_file(name))


class AdjectiveNounWords(Sequence[str]):
    """``sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))`` without building its 6.2 M strings.

    Every string of one adjective starts with ``adj + "-"``. Adjectives whose key ``adj + "-"`` starts with another
    adjective's key (``blue`` / ``blue-eyed``) are merged into one family whose strings are sorted explicitly; the
    families' keys are then prefix-free, so the sorted list is the concatenation of the families in key order, and
    inside a single-adjective family the order is the nouns' order. Indexing costs a bisect.
    """

    def __init__(self, adjectives: Sequence[str], nouns: Sequence[str]) -> None:
        self._nouns = sorted(set(nouns))
        keys = sorted({adj + "-" for adj in adjectives})
        blocks: list[tuple[str, list[str] | None]] = []  # (adjective, None) or (root, explicit sorted strings)
        i = 0
        while i < len(keys):
            root, j = keys[i], i + 1
            while j < len(keys) and keys[j].startswith(root):
                j += 1
            if j == i + 1:
                blocks.append((root[:-1], None))
            else:
                family = sorted({key + noun for key in keys[i:j] for noun in self._nouns})
                blocks.append((root, family))
            i = j
        self._blocks = blocks
        self._starts: list[int] = []
        total = 0
        for _, family in blocks:
            self._starts.append(total)
            total += len(self._nouns) if family is None else len(family)
        self._len = total

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("AdjectiveNounWords index out of range")
        block = bisect.bisect_right(self._starts, index) - 1
        name, family = self._blocks[block]
        offset = index - self._starts[block]
        if family is None:
            return f"{name}-{self._nouns[offset]}"
        return family[offset]


@functools.lru_cache(maxsize=None)
def adjective_noun_words() -> AdjectiveNounWords:
    """niah's ``words`` keys/values: the sorted unique ``adjective-noun`` pairs (6,175,260 with wonderwords 2.2.0)."""
    return AdjectiveNounWords(wonderwords_list("adjectivelist.txt"), wonderwords_list("nounlist.txt"))


@functools.lru_cache(maxsize=None)
def _sorted_common_words() -> tuple[str, ...]:
    words = wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt") + wonderwords_list("verblist.txt")
    return tuple(sorted(set(words)))


def common_words_vocabulary() -> list[str]:
    """cwe's ``sorted(set(nouns + adjs + verbs))`` (8,169 words with 2.2.0), before the seeded shuffle."""
    return list(_sorted_common_words())
