"""RULER's frequent-words-extraction generator (``synthetic/freq_words_extraction.py``, task ``fwe``).

Word counts follow a Zipf law: ``floor(num_words * k**-alpha / zeta(alpha))`` for rank k. ``zeta`` is computed
here without scipy (``pi**2/6`` for alpha = 2, Euler-Maclaurin otherwise). Upstream caps the text at
``max_seq_length`` itself, not ``max_seq_length - tokens_to_generate``, so ``length`` may exceed the target.
"""
from __future__ import annotations

import math
import string
from typing import Any, Callable

import numpy as np

from .common import Rngs, SampleDoesNotFit, remove_newline_tab

__all__ = ["zeta", "generate_freq_words"]

# B_2k / (2k)! for k = 1..8 (Bernoulli numbers over factorials), for the Euler-Maclaurin tail of zeta.
_BERNOULLI_OVER_FACTORIAL = (1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160, -691 / 1307674368000,
                             1 / 74724249600, -3617 / 10670622842880000)


def zeta(alpha: float) -> float:
    """The Riemann zeta function for real ``alpha > 1`` to double precision (scipy.special.zeta's value).

    ``zeta(2) == math.pi ** 2 / 6`` exactly (the float scipy returns); other values sum 20 terms and add the
    Euler-Maclaurin remainder with 8 Bernoulli corrections (relative error ~1e-16).
    """
    alpha = float(alpha)
    if not alpha > 1.0:
        raise ValueError(f"zeta(alpha) diverges for alpha <= 1 (got {alpha}); fwe needs alpha > 1")
    if alpha == 2.0:
        return math.pi ** 2 / 6
    n = 20
    head = [k ** -alpha for k in range(1, n)]
    tail = [n ** (1 - alpha) / (alpha - 1), 0.5 * n ** -alpha]
    rising = alpha  # alpha (alpha + 1) ... (alpha + 2j - 2)
    for j, coefficient in enumerate(_BERNOULLI_OVER_FACTORIAL, start=1):
        tail.append(coefficient * rising * n ** (-alpha - 2 * j + 1))
        rising *= (alpha + 2 * j - 1) * (alpha + 2 * j)
    return math.fsum(head + tail)


class _Fwe:
    def __init__(self, rngs: Rngs, template: str, count: Callable[[str], int], coded_wordlen: int, vocab_size: int,
                 alpha: float) -> None:
        self.rngs, self.template, self.count = rngs, template, count
        self.coded_wordlen, self.vocab_size, self.alpha = coded_wordlen, vocab_size, alpha
        self.zeta = zeta(alpha)

    def _vocab(self) -> list[str]:
        rng, size = self.rngs.py, self.vocab_size
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)) for _ in range(size)]
        while len(set(vocab)) < size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        vocab = sorted(set(vocab))
        self.rngs.fresh().shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        return vocab

    def _text(self, vocab: list[str], num_words: int) -> tuple[str, list[str]]:
        ranks = np.arange(1, len(vocab) + 1)
        counts = (num_words * (ranks ** -self.alpha) / self.zeta).astype(int)
        words = [word for word, repeat in zip(vocab, counts) for _ in range(repeat)]
        self.rngs.fresh().shuffle(words)
        return self.template.format(context=" ".join(words), query=""), vocab[1:4]

    def input_output(self, max_len: int, num_words: int, incremental: int) -> tuple[str, list[str], int]:
        vocab = self._vocab()
        if num_words > 0:
            text, answer = self._text(vocab, num_words)
            while self.count(text) > max_len:
                num_words -= incremental
                if num_words <= 0:
                    raise SampleDoesNotFit(f"fwe: even an empty text exceeds max_len={max_len}")
                text, answer = self._text(vocab, num_words)
        else:
            num_words = max_len // self.coded_wordlen
            text, answer = self._text(vocab, num_words)
            while self.count(text) < max_len:
                num_words += incremental
                text, answer = self._text(vocab, num_words)
            num_words -= incremental
        text, answer = self._text(vocab, num_words)
        return text, answer, num_words


def generate_freq_words(
    args: dict[str, Any], template: str, count: Callable[[str], int], max_seq_length: int, tokens_to_generate: int,
    num_samples: int, seed: int, remove_newline: bool = False,
) -> list[dict[str, Any]]:
    """Samples of ``fwe`` (args: ``alpha``, ``coded_wordlen`` = 6, ``vocab_size`` = -1 meaning L // 50)."""
    rngs = Rngs(seed)
    vocab_size = int(args.get("vocab_size", -1))
    vocab_size = max_seq_length // 50 if vocab_size == -1 else vocab_size
    if vocab_size < 4:
        raise ValueError(f"fwe needs vocab_size >= 4 (max_seq_length // 50 = {vocab_size}); use a longer length")
    gen = _Fwe(rngs, template, count, int(args.get("coded_wordlen", 6)), vocab_size, float(args.get("alpha", 2.0)))
    incremental = max_seq_length // 32
    _, _, num_words = gen.input_output(max_seq_length, -1, incremental)
    records = []
    for index in range(num_samples):
        text, answer, _ = gen.input_output(max_seq_length, num_words, incremental)
        length = count(text) + tokens_to_generate
        if remove_newline:
            text = remove_newline_tab(text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length})
    return records
