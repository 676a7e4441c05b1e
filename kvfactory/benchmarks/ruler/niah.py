"""RULER's needle-in-a-haystack generator (``synthetic/niah.py``): 8 of the 13 tasks.

Random draws follow the upstream script call for call (global ``random`` replaced by a private ``random.Random``
seeded identically; see :class:`~kvfactory.benchmarks.ruler.common.Rngs`).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from .common import Rngs, SampleDoesNotFit, remove_newline_tab
from .constants import NOISE, TASK_TEMPLATES
from .essays import sent_tokenize
from .wordlists import adjective_noun_words

__all__ = ["DEPTHS", "NEEDLE", "singularize", "generate_niah"]

logger = logging.getLogger(__name__)

#: Needle depths in percent: ``np.round(np.linspace(0, 100, 40)).astype(int)``.
DEPTHS: list[int] = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: Retries at the smallest haystack before giving up (upstream retries forever).
MAX_RETRIES = 1000


def singularize(template: str) -> str:
    """RULER's rewrite of the whole template when one value is asked for (``q * v == 1``)."""
    return (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


class _Niah:
    def __init__(self, args: dict[str, Any], template: str, rngs: Rngs, haystack: Sequence[str] | str,
                 protect_wrapper: bool = False) -> None:
        self.k = max(int(args["num_needle_k"]), int(args["num_needle_q"]))
        self.v = int(args["num_needle_v"])
        self.q = int(args["num_needle_q"])
        self.type_haystack = args["type_haystack"]
        self.type_k, self.type_v = args["type_needle_k"], args["type_needle_v"]
        self.template, self.rngs, self.haystack = template, rngs, haystack
        # the wrapper text before the task template, kept out of singularisation for custom wrappers
        self.protected = template[:template.index(TASK_TEMPLATES["niah"]["template"][:20])] if protect_wrapper else ""
        if self.type_haystack not in ("essay", "repeat", "needle"):
            raise ValueError(f"type_haystack {self.type_haystack!r} not in ('essay', 'repeat', 'needle')")
        for kind in (self.type_k, self.type_v):
            if kind not in ("numbers", "words", "uuids"):
                raise ValueError(f"needle type {kind!r} not in ('numbers', 'words', 'uuids')")
        self.words = adjective_noun_words() if "words" in (self.type_k, self.type_v) else None

    def random_value(self, kind: str) -> str:
        rng = self.rngs.py
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            return rng.choice(self.words)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def input_output(self, num_haystack: int) -> tuple[str, list[str]]:
        rng = self.rngs.py
        keys, values, needles = [], [], []
        for _ in range(self.k):
            keys.append(self.random_value(self.type_k))
            value = []
            for _ in range(self.v):
                value.append(self.random_value(self.type_v))
                needles.append(NEEDLE.format(type_needle_v=self.type_v, key=keys[-1], value=value[-1]))
            values.append(value)
        self.rngs.fresh().shuffle(needles)

        if self.type_haystack == "essay":
            sentences = sent_tokenize(" ".join(self.haystack[:num_haystack]).strip())
            depths = rng.sample(DEPTHS, len(needles))
            positions = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in depths) + [len(sentences)]
            parts = []
            for i in range(1, len(positions)):
                parts.append(" ".join(sentences[positions[i - 1]:positions[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if self.type_haystack == "repeat":
                lines = [NOISE] * num_haystack
            else:
                lines = [NEEDLE.format(type_needle_v=self.type_v, key=self.random_value(self.type_k),
                                       value=self.random_value(self.type_v)) for _ in range(num_haystack)]
            indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
            for index, needle in zip(indexes, needles):
                lines.insert(index, needle)
            context = "\n".join(lines)

        chosen = rng.sample(range(self.k), self.q)
        queries = [keys[i] for i in chosen]
        answers = [a for i in chosen for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_needle_v = self.template, self.type_v
        if self.q * self.v == 1:
            template = self.protected + singularize(template[len(self.protected):])
            type_needle_v = type_needle_v[:-1]
        return template.format(type_needle_v=type_needle_v, context=context, query=query), answers


def generate_niah(
    args: dict[str, Any], template: str, count: Callable[[str], int], max_seq_length: int, tokens_to_generate: int,
    num_samples: int, seed: int, haystack: Sequence[str] | None = None, remove_newline: bool = False,
    protect_wrapper: bool = False,
) -> list[dict[str, Any]]:
    """Samples of one niah task, as ``niah.py`` writes them.

    Parameters
    ----------
    args : dict
        The task's ``synthetic.yaml`` args (haystack type, needle types, k/v/q).
    template : str
        The final template (model wrapper + task template + answer prefix).
    count : callable
        Token counter (no special tokens).
    haystack : sequence of str, optional
        The essay word list; required for ``type_haystack == "essay"``.
    protect_wrapper : bool
        Singularise only from the task template on (custom wrappers); RULER rewrites the whole template.
    """
    rngs = Rngs(seed)
    essay = args["type_haystack"] == "essay"
    if essay and haystack is None:
        raise ValueError("an essay niah task needs the essay word list")
    gen = _Niah(args, template, rngs, haystack if essay else NOISE, protect_wrapper)
    if essay:
        incremental = 500
    else:
        incremental = 5 if max_seq_length < 4096 else 25

    num_haystack, total = incremental, 0
    while total + tokens_to_generate < max_seq_length:
        text, answers = gen.input_output(num_haystack)
        total = count(text + " ".join(answers))
        logger.debug("niah search: haystack %d -> %d tokens", num_haystack, total + tokens_to_generate)
        if total + tokens_to_generate > max_seq_length:
            num_haystack -= incremental
            break
        if essay and num_haystack > len(haystack):
            num_haystack = len(haystack)
            break
        num_haystack += incremental
    if num_haystack <= 0:
        raise SampleDoesNotFit(f"max_seq_length={max_seq_length} is too short for even {incremental} haystack units")

    records = []
    for index in range(num_samples):
        used, failures = num_haystack, 0
        while True:
            text, answers = gen.input_output(used)
            length = count(text) + tokens_to_generate
            if length <= max_seq_length:
                break
            if used > incremental:
                used -= incremental
            else:
                failures += 1
                if failures > MAX_RETRIES:
                    raise SampleDoesNotFit(f"sample {index} exceeds max_seq_length={max_seq_length} ({length})")
        if remove_newline:
            text = remove_newline_tab(text)
        records.append({"index": index, "input": text, "outputs": answers, "length": length})
    return records
