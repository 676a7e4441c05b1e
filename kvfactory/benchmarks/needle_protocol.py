"""Needle-in-a-haystack, model-free: haystack, needle insertion, exact-length prompts, scoring and result cells.

Works with any Hugging Face-like tokenizer: ``encode(text, add_special_tokens=False) -> list[int]`` and
``decode(ids, skip_special_tokens=True) -> str`` (plus ``apply_chat_template`` / ``chat_template`` for chat prompts).
Protocols followed: gkamradt/LLMTest_NeedleInAHaystack @ 7b90d28 and KVCache-Factory ``run_needle_in_haystack.py``
(see ``shared/specs/benchmarks.md`` §3). What is kept, and what differs on purpose:

Kept
    The classic needle (:data:`NEEDLE`, leading and trailing newline); the essays in sorted file order, concatenated
    with no separator, in whole passes, until long enough (KVCF; gkamradt's glob is unsorted); the insertion point
    ``int(n * (depth / 100))`` computed exactly as upstream (so ``n=100, depth=29`` gives 28, a float artefact both
    upstreams share), walked back to just after the last sentence-end token, position 0 when none, appended at
    depth 100; KVCF's 10 depths (:data:`DEFAULT_DEPTHS`); ROUGE-1 F as ``rouge-score`` 0.1.2 computes it.

Differs
    - **Exact length.** Upstream subtracts a fixed 200-token buffer and re-tokenizes the decoded context, so its
      prompts are roughly ``L - 170`` tokens (a ~30-token wrapper around ``L - 200``). Here the real prompt overhead
      is measured (:func:`prompt_parts`) and the haystack is trimmed in tokens so that
      ``len(prompt_ids) == context_length`` exactly. The prompt is assembled from token ids (template prefix +
      context ids + template suffix), never decoded and re-encoded. Passing ``prompt_overhead_tokens=200``
      to :func:`build_context` reproduces KVCF's context size instead.
    - **Sentence ends from the tokenizer** (:func:`sentence_end_token_ids`), not ``encode('.')`` (gkamradt: only the
      bare ``"."`` token, so ``".\\n"`` does not count) or hard-coded ids (KVCF: Llama-3 ``[13]``, Mistral
      ``[842, 28723]``, nothing for other models).
    - **The question**, :data:`RETRIEVAL_QUESTION`, is gkamradt's "What is the best thing to do in San Francisco?",
      not KVCF's completion cue ``"The best thing to do in San Francisco is: "``. Prompts go through the model's
      chat template, where the user turn is a request and the assistant turn starts fresh: a question is what an
      instruct model is trained to answer there, while a dangling sentence fragment as the user's message is not
      continued by the assistant turn the way it is in KVCF's raw ``Question: ...\\nAnswer:`` completion prompt.
      The plain fallback prompt (no chat template) ends with an ``Answer:`` cue.
      :data:`KVCF_RETRIEVAL_QUESTION` is there for parity runs.
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
import math
import os
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "NEEDLE", "RETRIEVAL_QUESTION", "KVCF_RETRIEVAL_QUESTION", "DEFAULT_DEPTHS", "NOISE_SENTENCE", "STOP_WORDS",
    "HaystackNotFound", "default_haystack_dir", "load_haystack_text", "noise_haystack",
    "sentence_end_token_ids", "is_sentence_end", "NeedleContext", "build_context", "PromptParts", "prompt_parts",
    "prompt_overhead", "build_prompt_ids", "has_chat_template", "CELL_FIELDS", "key_words", "needle_recall",
    "rouge1_f", "rouge_tokens", "score_answer",
    "cell_filename", "write_cell", "read_cells", "completed_cells",
]

logger = logging.getLogger(__name__)

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
"""The classic needle (gkamradt and KVCF), with its leading and trailing newline."""

RETRIEVAL_QUESTION = "What is the best thing to do in San Francisco?"
"""gkamradt's retrieval question (used here; see the module docstring for why not KVCF's cue)."""

KVCF_RETRIEVAL_QUESTION = "The best thing to do in San Francisco is: "
"""KVCache-Factory's completion cue, for parity runs with its raw (non-chat) prompt."""

DEFAULT_DEPTHS: list[float] = [float(d) for d in np.round(np.linspace(0, 100, 10))]
"""KVCF's 10 linear depths: 0, 11, 22, 33, 44, 56, 67, 78, 89, 100."""

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's (and the passkey test's) neutral filler, repeated when no essays are at hand."""

HAYSTACK_HINT = ("fetch the essays with `bash scripts/download_essays.sh` (into data/PaulGrahamEssays), pass "
                 "--haystack_dir DIR (a folder of *.txt essays, e.g. ../shared/data/PaulGrahamEssays) or "
                 "--haystack noise (RULER's repeated filler sentences, no files needed)")

CONTEXT_OPEN = "<document>"
CONTEXT_CLOSE = "</document>"
INSTRUCTION = ("Below is a long document. Read it, then answer the question that follows it, using only the "
               "information in the document. Keep the answer short: one sentence.")
_PLACEHOLDER = "@@KVFACTORY_NEEDLE_CONTEXT@@"


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


@functools.lru_cache(maxsize=4)
def _read_essays(paths: tuple[str, ...]) -> str:
    parts = []
    for path in paths:
        with open(path, "rb") as handle:
            parts.append(handle.read().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n"))
    return "".join(parts)


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
    text = _read_essays(tuple(str(path) for path in files))
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


# ----------------------------------------------------------------------------------------------------------- prompt
@dataclass(frozen=True)
class PromptParts:
    """Token ids that go before and after the context; ``prompt = prefix_ids + context_ids + suffix_ids``."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    chat_template: bool

    @property
    def overhead(self) -> int:
        """Prompt tokens besides the context."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def assemble(self, context_ids: Sequence[int]) -> list[int]:
        return [*self.prefix_ids, *context_ids, *self.suffix_ids]


def _user_message(question: str, context: str) -> str:
    return f"{INSTRUCTION}\n\n{CONTEXT_OPEN}\n{context}\n{CONTEXT_CLOSE}\n\nQuestion: {question}"


def _plain_prompt(question: str, context: str) -> str:
    return f"{_user_message(question, context)}\nAnswer:"


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids ``encode(text)`` puts before the text by default (BOS for most models), found by comparison."""
    probe = "Hello"
    try:
        plain = list(tokenizer.encode(probe, add_special_tokens=False))
        full = list(tokenizer.encode(probe, add_special_tokens=True))
    except TypeError:
        return []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def prompt_parts(tokenizer: Any, question: str = RETRIEVAL_QUESTION, *, use_chat_template: bool = True,
                 system_prompt: str | None = None) -> PromptParts:
    """The prompt around the context, as ids.

    With a chat template (and ``use_chat_template``): one user turn (after ``system_prompt`` when given; otherwise
    whatever default system turn the template adds) holding :data:`INSTRUCTION`, the context between
    ``<document>`` / ``</document>`` lines, then ``Question: {question}``; ``add_generation_prompt=True``. The template
    is rendered once with a placeholder for the context and each side is encoded with ``add_special_tokens=False``
    (as ``apply_chat_template`` does; templates write their own BOS).

    Without one: the same user text followed by ``\\nAnswer:``, after the tokenizer's default leading special tokens
    (BOS), like a plain ``tokenizer(prompt)``.
    """
    if use_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": _user_message(question, _PLACEHOLDER)}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = rendered.split(_PLACEHOLDER)
        if len(pieces) != 2:
            raise ValueError(f"the chat template rendered the context placeholder {len(pieces) - 1} times, not once")
        prefix = list(tokenizer.encode(pieces[0], add_special_tokens=False))
        suffix = list(tokenizer.encode(pieces[1], add_special_tokens=False))
        return PromptParts(tuple(prefix), tuple(suffix), chat_template=True)
    if use_chat_template:
        logger.info("the tokenizer has no chat template: using the plain prompt")
    if system_prompt is not None:
        raise ValueError("system_prompt needs a tokenizer with a chat template (use_chat_template=True)")
    before, after = _plain_prompt(question, _PLACEHOLDER).split(_PLACEHOLDER)
    prefix = _leading_special_ids(tokenizer) + list(tokenizer.encode(before, add_special_tokens=False))
    suffix = list(tokenizer.encode(after, add_special_tokens=False))
    return PromptParts(tuple(prefix), tuple(suffix), chat_template=False)


def prompt_overhead(tokenizer: Any, question: str = RETRIEVAL_QUESTION, *, use_chat_template: bool = True,
                    system_prompt: str | None = None) -> int:
    """Tokens the prompt adds around the context: pass it to :func:`build_context` as ``prompt_overhead_tokens``."""
    return prompt_parts(tokenizer, question, use_chat_template=use_chat_template, system_prompt=system_prompt).overhead


def build_prompt_ids(tokenizer: Any, context_ids: Sequence[int], question: str = RETRIEVAL_QUESTION,
                     use_chat_template: bool = True, *, system_prompt: str | None = None) -> list[int]:
    """The full prompt ids: :func:`prompt_parts` around ``context_ids`` (length = overhead + ``len(context_ids)``).

    Together with :func:`build_context` (given ``prompt_overhead_tokens=prompt_overhead(...)`` with the same
    arguments) the result has exactly ``context_length`` tokens.
    """
    parts = prompt_parts(tokenizer, question, use_chat_template=use_chat_template, system_prompt=system_prompt)
    return parts.assemble(context_ids)


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
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    os.replace(temporary, path)
    return path


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
