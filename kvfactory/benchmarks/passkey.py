"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300): a 5-digit key hidden at a
chosen depth in filler text, asked for at the end. The filler is the paper's repeated sentences (fully synthetic, so
it runs anywhere) or, with ``haystack=``, real prose such as the Paul Graham essays (the needle is then inserted at a
sentence boundary, and the model cannot find it by spotting the one sentence that breaks a pattern)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


@dataclass
class PasskeySample:
    """One prompt: token ids (chat template applied when the tokenizer has one) and the key to find."""

    input_ids: list[int]
    passkey: str
    depth: float


HAYSTACK_UNIT = 64  # characters of a prose haystack per growth step


def _split_filler(units: int, depth: float, haystack: str | None) -> tuple[str, str]:
    """The filler before and after the needle: ``units`` repeats of :data:`FILLER`, or the first
    ``units * HAYSTACK_UNIT`` characters of ``haystack`` cut after the sentence end nearest to ``depth``."""
    if haystack is None:
        before = int(round(units * depth))
        return FILLER * before, FILLER * (units - before)
    text = haystack[:units * HAYSTACK_UNIT]
    cut = int(round(len(text) * depth))
    if 0 < cut < len(text):
        ends = [match.end() for match in re.finditer(r"[.!?]\s+", text)]
        if ends:
            cut = min(ends, key=lambda end: abs(end - cut))
    before, after = text[:cut], text[cut:]
    return (before if not before or before[-1].isspace() else before + " "), after


def make_passkey_sample(tokenizer: Any, target_tokens: int, depth: float, *, seed: int = 0,
                        use_chat_template: bool = True, haystack: str | None = None) -> PasskeySample:
    """A prompt of about ``target_tokens`` tokens (never more) with the key at relative ``depth`` in [0, 1].

    The filler (:data:`FILLER` repeated, or the prose ``haystack``) is grown until the full prompt (template
    included) reaches the target.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    passkey = str(random.Random(seed).randint(10000, 99999))
    needle = NEEDLE.format(key=passkey)
    limit = None if haystack is None else len(haystack) // HAYSTACK_UNIT

    def render(units: int) -> list[int]:
        before, after = _split_filler(units, depth, haystack)
        body = INSTRUCTION + " " + before + needle + after + "\n" + QUESTION
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            ) + ANSWER_PREFIX
            return tokenizer(text, add_special_tokens=False).input_ids
        return tokenizer(body + "\n" + ANSWER_PREFIX).input_ids

    low, high = 0, 1
    while len(render(high)) <= target_tokens:
        if limit is not None and high >= limit:
            raise ValueError(f"the haystack ({len(haystack or '')} characters) is too short for {target_tokens} tokens")
        low, high = high, high * 2
    while high - low > 1:  # largest repeat count that fits
        middle = (low + high) // 2
        low, high = (middle, high) if len(render(middle)) <= target_tokens else (low, middle)
    return PasskeySample(render(low), passkey, depth)


def passkey_found(answer: str, passkey: str) -> bool:
    """Whether the first number in the answer is the key."""
    numbers = re.findall(r"\d+", answer)
    return bool(numbers) and numbers[0] == passkey


# ------------------------------------------------------------------------------------------- the passkey grid runner
def grid_key(length: int, depth_percent: int, seed: int) -> str:
    """The id of one passkey prompt in a results file."""
    return f"{length}-{depth_percent}-{seed}"


def grid_jobs(tokenizer: Any, lengths: list[int], depth_percents: list[int], seeds: int, stop_token_ids: list[int],
              *, haystack: str | None, max_new_tokens: int = 12) -> list[Any]:
    """One :class:`~kvfactory.benchmarks.common.Job` per (length, depth, seed); the seed picks the key (the same
    key at every length and depth of one seed)."""
    from kvfactory.benchmarks.common import Job

    jobs = []
    for length in lengths:
        for depth in depth_percents:
            for seed in range(seeds):
                sample = make_passkey_sample(tokenizer, length, depth / 100, seed=seed, haystack=haystack)
                jobs.append(Job(grid_key(length, depth, seed), sample.input_ids, max_new_tokens, stop_token_ids,
                                {"length": length, "depth": depth, "seed": seed, "passkey": sample.passkey}))
    return jobs


def summarize(records: list[dict[str, Any]]) -> dict[int, dict[int, tuple[int, int]]]:
    """``{length: {depth: (found, total)}}`` over passkey records (each needs ``pred`` and ``passkey``)."""
    table: dict[int, dict[int, tuple[int, int]]] = {}
    for record in records:
        cell = table.setdefault(record["length"], {}).get(record["depth"], (0, 0))
        found = passkey_found(record["pred"], record["passkey"])
        table[record["length"]][record["depth"]] = (cell[0] + found, cell[1] + 1)
    return {length: dict(sorted(row.items())) for length, row in sorted(table.items())}
