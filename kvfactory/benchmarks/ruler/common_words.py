"""RULER's common-words-extraction generator (``synthetic/common_words_extraction.py``, task ``cwe``).

A one-shot example (a full wrapped turn followed by its numbered answer, no space after the answer prefix) precedes
the task. Below 4096 tokens the example is 20 words (3x/1x) and the task repeats common words 6x and the others 1x;
from 4096 on the example is 40 words (10x/3x) and the task uses ``freq_cw``/``freq_ucw``. Only ``random`` is used
(upstream does not seed numpy here).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .common import Rngs, SampleDoesNotFit, remove_newline_tab
from .wordlists import common_words_vocabulary

__all__ = ["generate_common_words"]

logger = logging.getLogger(__name__)
MAX_RETRIES = 1000


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


class _Cwe:
    def __init__(self, rngs: Rngs, template: str, max_seq_length: int, freq_cw: int, freq_ucw: int,
                 num_cw: int) -> None:
        self.rngs, self.template, self.max_seq_length = rngs, template, max_seq_length
        self.freq_cw, self.freq_ucw, self.num_cw = freq_cw, freq_ucw, num_cw
        self.words = common_words_vocabulary()
        rngs.fresh().shuffle(self.words)

    def example(self, num_words: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
        full = self.rngs.py.sample(self.words, num_words)
        common, uncommon = full[:self.num_cw], full[self.num_cw:]
        listed = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        self.rngs.fresh().shuffle(listed)
        return _numbered(listed), common

    def input_output(self, num_words: int) -> tuple[str, list[str]]:
        if self.max_seq_length < 4096:
            context_example, answer_example = self.example(20, 3, 1)
            context, answer = self.example(num_words, 6, 1)
        else:
            context_example, answer_example = self.example(40, 10, 3)
            context, answer = self.example(num_words, self.freq_cw, self.freq_ucw)
        shot = self.template.format(context=context_example, query="") + _numbered(answer_example)
        return shot + "\n" + self.template.format(context=context, query=""), answer


def generate_common_words(
    args: dict[str, Any], template: str, count: Callable[[str], int], max_seq_length: int, tokens_to_generate: int,
    num_samples: int, seed: int, remove_newline: bool = False,
) -> list[dict[str, Any]]:
    """Samples of ``cwe`` (args: ``freq_cw``, ``freq_ucw``, ``num_cw``), search in steps of 10 words."""
    rngs = Rngs(seed)
    gen = _Cwe(rngs, template, max_seq_length, int(args.get("freq_cw", 30)), int(args.get("freq_ucw", 3)),
               int(args.get("num_cw", 10)))
    incremental = 10
    num_words, total = incremental, 0
    while total + tokens_to_generate < max_seq_length:
        text, answer = gen.input_output(num_words)
        total = count(text + " " + _numbered(answer))
        if total + tokens_to_generate > max_seq_length:
            num_words -= incremental
            break
        num_words += incremental
        if num_words > len(gen.words):
            num_words = len(gen.words)
            break
    if num_words < gen.num_cw:
        raise SampleDoesNotFit(f"cwe: max_seq_length={max_seq_length} is too short for the one-shot example")

    records = []
    for index in range(num_samples):
        used, failures = num_words, 0
        while True:
            text, answer = gen.input_output(used)
            length = count(text) + tokens_to_generate
            if length <= max_seq_length:
                break
            if used > incremental:
                used -= incremental
            else:
                failures += 1
                if failures > MAX_RETRIES:
                    raise SampleDoesNotFit(f"cwe sample {index} exceeds max_seq_length={max_seq_length}")
        if remove_newline:
            text = remove_newline_tab(text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length})
    return records
