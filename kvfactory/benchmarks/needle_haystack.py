"""Needle-in-a-haystack, model-free, part 1 of 3: the haystack and the needle inside it, as token ids.

Holds the needle (:data:`NEEDLE`), the depths (:data:`DEFAULT_DEPTHS`), the haystack text (:func:`load_haystack_text`,
:func:`noise_haystack`), the sentence ends of a tokenizer (:func:`sentence_end_token_ids`) and the exact-length
context with the needle inserted (:func:`build_context`). The prompt around that context is in
:mod:`kvfactory.benchmarks.needle_prompt`; scoring an answer and the per-cell result files in
:mod:`kvfactory.benchmarks.needle_scoring`; the grid runner in :mod:`kvfactory.benchmarks.needle`.

Works with any Hugging Face-like tokenizer: ``encode(text, add_special_tokens=False) -> list[int]`` and
``decode(ids, skip_special_tokens=True) -> str`` (plus ``apply_chat_template`` / ``chat_template`` for chat prompts).
Protocols followed: gkamradt/LLMTest_NeedleInAHaystack @ 7b90d28 and KVCache-Factory ``run_needle_in_haystack.py``
(see ``shared/specs/benchmarks.md`` §3). What is kept, and what differs on purpose (the question and the prompt:
:mod:`~kvfactory.benchmarks.needle_prompt`; scoring and results: :mod:`~kvfactory.benchmarks.needle_scoring`):

Kept
    The classic needle (:data:`NEEDLE`, leading and trailing newline); the essays in sorted file order, concatenated
    with no separator, in whole passes, until long enough (KVCF; gkamradt's glob is unsorted); the insertion point
    ``int(n * (depth / 100))`` computed exactly as upstream (so ``n=100, depth=29`` gives 28, a float artefact both
    upstreams share), walked back to just after the last sentence-end token, position 0 when none, appended at
    depth 100; KVCF's 10 depths (:data:`DEFAULT_DEPTHS`).

Differs
    - **Exact length.** Upstream subtracts a fixed 200-token buffer and re-tokenizes the decoded context, so its
      prompts are roughly ``L - 170`` tokens (a ~30-token wrapper around ``L - 200``). Here the real prompt overhead
      is measured (:func:`~kvfactory.benchmarks.needle_prompt.prompt_parts`) and the haystack is trimmed in tokens so
      that ``len(prompt_ids) == context_length`` exactly. The prompt is assembled from token ids (template prefix +
      context ids + template suffix), never decoded and re-encoded. Passing ``prompt_overhead_tokens=200``
      to :func:`build_context` reproduces KVCF's context size instead.
    - **Sentence ends from the tokenizer** (:func:`sentence_end_token_ids`), not ``encode('.')`` (gkamradt: only the
      bare ``"."`` token, so ``".\\n"`` does not count) or hard-coded ids (KVCF: Llama-3 ``[13]``, Mistral
      ``[842, 28723]``, nothing for other models).
"""
from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kvfactory.paths import read_text_files

__all__ = [
    "NEEDLE", "DEFAULT_DEPTHS", "NOISE_SENTENCE", "HaystackNotFound", "default_haystack_dir", "load_haystack_text",
    "noise_haystack", "sentence_end_token_ids", "is_sentence_end", "NeedleContext", "build_context",
]

logger = logging.getLogger(__name__)

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
"""The classic needle (gkamradt and KVCF), with its leading and trailing newline."""

DEFAULT_DEPTHS: list[float] = [float(d) for d in np.round(np.linspace(0, 100, 10))]
"""KVCF's 10 linear depths: 0, 11, 22, 33, 44, 56, 67, 78, 89, 100."""

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's (and the passkey test's) neutral filler, repeated when no essays are at hand."""

HAYSTACK_HINT = ("fetch the essays with `bash scripts/download_essays.sh` (into data/PaulGrahamEssays), pass "
                 "--haystack_dir DIR (a folder of *.txt essays, e.g. ../shared/data/PaulGrahamEssays) or "
                 "--haystack noise (RULER's repeated filler sentences, no files needed)")


# --------------------------------------------------------------------------------------------------------- haystack
class HaystackNotFound(FileNotFoundError):
    """The essay folder is missing or holds no ``*.txt`` file (the message says which flags fix it)."""


def default_haystack_dir() -> Path | None:
    """The first essay folder that exists: ``data/PaulGrahamEssays`` in the repository (where
    ``scripts/download_essays.sh`` puts them), then ``{shared data}/PaulGrahamEssays`` (see
    :func:`kvfactory.paths.shared_data_dir`); None when neither does."""
    from kvfactory.paths import REPO_ROOT, shared_data_dir

    root = shared_data_dir()
    candidates = [REPO_ROOT / "data" / "PaulGrahamEssays"] + ([root / "PaulGrahamEssays"] if root else [])
    return next((folder for folder in candidates if folder.is_dir()), None)



def _repeat_until(text: str, min_tokens: int, tokenizer: Any | None, joiner: str) -> str:
    """``text`` repeated in whole copies (joined by ``joiner``) until it encodes to at least ``min_tokens`` tokens."""
    if min_tokens <= 0:
        return text
    if tokenizer is None:
        raise ValueError("min_tokens needs a tokenizer to count tokens with")
    one = len(tokenizer.encode(text, add_special_tokens=False))
    if one == 0:
        raise ValueError("the haystack text encodes to no tokens")
    copies = max(1, math.ceil(min_tokens / one))
    result = joiner.join([text] * copies)
    while len(tokenizer.encode(result, add_special_tokens=False)) < min_tokens:  # merges at the seams, rarely
        copies += 1
        result = joiner.join([text] * copies)
    return result


def load_haystack_text(haystack_dir: str | Path | None = None, *, min_tokens: int = 0,
                       tokenizer: Any | None = None) -> str:
    """The essays of ``haystack_dir``: sorted ``*.txt``, CRLF/CR normalised to LF, concatenated with no separator.

    Parameters
    ----------
    haystack_dir
        Folder of ``*.txt`` files; ``None`` uses :func:`default_haystack_dir`.
    min_tokens
        Repeat whole passes over all files (as upstream does) until the text has at least this many tokens of
        ``tokenizer``; 0 (default) gives one pass (the 49 Paul Graham essays: about 150k tokens).
    tokenizer
        Needed only when ``min_tokens > 0``.

    Raises
    ------
    HaystackNotFound
        When the folder is missing or holds no ``*.txt``; the message names ``--haystack_dir`` and ``--haystack noise``.
    """
    folder = Path(haystack_dir) if haystack_dir is not None else default_haystack_dir()
    if folder is None:
        raise HaystackNotFound(f"no essay folder given, and neither data/PaulGrahamEssays nor a shared "
                               f"PaulGrahamEssays folder exists: {HAYSTACK_HINT}")
    if not folder.is_dir():
        raise HaystackNotFound(f"essay folder {folder} does not exist: {HAYSTACK_HINT}")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise HaystackNotFound(f"essay folder {folder} holds no *.txt file: {HAYSTACK_HINT}")
    text = read_text_files(files)
    return _repeat_until(text, min_tokens, tokenizer, joiner="")


def noise_haystack(min_tokens: int = 0, tokenizer: Any | None = None, *, repeats: int = 100) -> str:
    """:data:`NOISE_SENTENCE` repeated (space-joined): ``repeats`` copies, or enough for ``min_tokens`` tokens."""
    if min_tokens > 0:
        return _repeat_until(NOISE_SENTENCE, min_tokens, tokenizer, joiner=" ")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return " ".join([NOISE_SENTENCE] * repeats)


# ----------------------------------------------------------------------------------------------------- sentence ends
_CLOSERS = "\"'\u201d\u2019)]"
_SENTENCE_END = re.compile(rf"^\s*[{re.escape(_CLOSERS)}]*(\.|[!?]+|[\u3002\uff01\uff1f]+)[{re.escape(_CLOSERS)}]*\s*$")


def is_sentence_end(token_text: str) -> bool:
    """Whether a single token's decoded text ends a sentence.

    The rule: after stripping surrounding whitespace (spaces, newlines, tabs), the text is one ``.``, or a run of
    ``!``/``?`` (also the CJK ``。！？``), optionally preceded or followed by closing quotes or brackets
    (``" ' ” ’ ) ]``). So ``"."``, ``" ."``, ``".\\n"``, ``".\\n\\n"``, ``'."'``, ``").\"`` and ``"?!"`` count; word
    tokens that end in a period (``"Mr."``, ``"etc."``, ``"1."``, mostly abbreviations) and ellipses (``"..."``) do
    not.
    """
    return bool(_SENTENCE_END.match(token_text))


_SENTENCE_END_CACHE: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        if size is None:
            raise TypeError("the tokenizer gives no vocabulary size (len(tokenizer) or .vocab_size)") from None
        return int(size)


def sentence_end_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every token whose decoded text ends a sentence (see :func:`is_sentence_end` for the rule).

    Each id ``0 .. len(tokenizer) - 1`` is decoded alone (``decode([id])``; ``batch_decode`` when available); the
    answer is cached per tokenizer object. Special tokens decode to ``""`` and never count.

    Raises
    ------
    ValueError
        When no token qualifies (the walk back would always land on position 0).
    """
    try:
        return set(_SENTENCE_END_CACHE[tokenizer])
    except (KeyError, TypeError):
        pass
    size = _vocab_size(tokenizer)
    ids = list(range(size))
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    else:
        texts = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    found = frozenset(i for i, text in zip(ids, texts) if is_sentence_end(text))
    if not found:
        raise ValueError("no token of this tokenizer decodes to a sentence end ('.', '!', '?')")
    try:
        _SENTENCE_END_CACHE[tokenizer] = found
    except TypeError:  # not weak-referenceable: no cache
        pass
    logger.debug("%d sentence-end tokens found in a vocabulary of %d", len(found), size)
    return set(found)


# ---------------------------------------------------------------------------------------------------------- context
@dataclass
class NeedleContext:
    """A haystack with the needle inside, as token ids.

    Attributes
    ----------
    ids
        Context token ids (haystack and needle), ``context_length - prompt_overhead_tokens`` of them.
    insertion_index
        Index in ``ids`` of the needle's first token.
    needle_tokens
        How many tokens the needle has.
    depth_percent
        The depth asked for.
    """

    ids: list[int] = field(repr=False)
    insertion_index: int
    needle_tokens: int
    depth_percent: float
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text(self) -> str:
        """The context decoded, for records and inspection. Prompts must be built from ``ids``: re-encoding this text
        can merge tokens at the needle's edges (SmolLM2: one token fewer in about half the cells)."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    @property
    def actual_depth_percent(self) -> float:
        """Where the needle really starts, in percent of the haystack tokens around it."""
        haystack = len(self.ids) - self.needle_tokens
        return 100.0 * self.insertion_index / haystack if haystack else 0.0


def build_context(tokenizer: Any, haystack_text: str | Sequence[int], needle: str, depth_percent: float,
                  context_length: int, prompt_overhead_tokens: int = 0, *,
                  sentence_ends: Iterable[int] | None = None) -> NeedleContext:
    """Trim the haystack and insert the needle so that context + needle + overhead is ``context_length`` tokens.

    Parameters
    ----------
    tokenizer
        HF-like tokenizer (``encode(text, add_special_tokens=False)``, ``decode``).
    haystack_text
        The haystack as text, or already encoded (ids; saves re-encoding a long text for every cell).
    needle
        The needle text (encoded without special tokens).
    depth_percent
        0–100. The target index is ``int(n * (depth_percent / 100))`` over the ``n`` trimmed haystack tokens, walked
        back to just after the last sentence-end token at or before it (position 0 if none); 100 appends.
    context_length
        The final prompt length in tokens.
    prompt_overhead_tokens
        Tokens the prompt adds around the context (:func:`prompt_overhead`); the haystack keeps
        ``context_length - prompt_overhead_tokens - len(needle_ids)`` tokens.
    sentence_ends
        Sentence-end ids; default :func:`sentence_end_token_ids` of ``tokenizer``.

    Raises
    ------
    ValueError
        On a depth outside [0, 100], a length too small for the needle and overhead, or a haystack too short.
    """
    depth = float(depth_percent)
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"depth_percent must be in [0, 100], got {depth_percent}")
    needle_ids = list(tokenizer.encode(needle, add_special_tokens=False))
    keep = int(context_length) - int(prompt_overhead_tokens) - len(needle_ids)
    if keep < 0:
        raise ValueError(f"context_length {context_length} is smaller than the needle ({len(needle_ids)} tokens) "
                         f"plus the prompt overhead ({prompt_overhead_tokens} tokens)")
    haystack_ids = (list(tokenizer.encode(haystack_text, add_special_tokens=False)) if isinstance(haystack_text, str)
                    else list(haystack_text))
    if len(haystack_ids) < keep:
        raise ValueError(f"the haystack has {len(haystack_ids)} tokens but {keep} are needed for context_length "
                         f"{context_length}: load it with load_haystack_text(..., min_tokens={keep}, tokenizer=...) "
                         f"or noise_haystack(min_tokens={keep}, tokenizer=...)")
    context = haystack_ids[:keep]
    if depth == 100.0:
        index = len(context)
    else:
        ends = set(sentence_ends) if sentence_ends is not None else sentence_end_token_ids(tokenizer)
        index = int(len(context) * (depth / 100))
        while index > 0 and context[index - 1] not in ends:
            index -= 1
    ids = context[:index] + needle_ids + context[index:]
    return NeedleContext(ids=ids, insertion_index=index, needle_tokens=len(needle_ids), depth_percent=depth,
                         tokenizer=tokenizer)
