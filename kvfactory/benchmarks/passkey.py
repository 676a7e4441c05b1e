"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300): a 5-digit key hidden at a
chosen depth in repeated filler text, asked for at the end. Fully synthetic, so it runs anywhere."""
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


def make_passkey_sample(tokenizer: Any, target_tokens: int, depth: float, *, seed: int = 0,
                        use_chat_template: bool = True) -> PasskeySample:
    """A prompt of about ``target_tokens`` tokens (never more) with the key at relative ``depth`` in [0, 1].

    The filler is grown sentence by sentence until the full prompt (template included) reaches the target.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    passkey = str(random.Random(seed).randint(10000, 99999))
    needle = NEEDLE.format(key=passkey)

    def render(repeats: int) -> list[int]:
        before = int(round(repeats * depth))
        body = INSTRUCTION + " " + FILLER * before + needle + FILLER * (repeats - before) + "\n" + QUESTION
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            ) + ANSWER_PREFIX
            return tokenizer(text, add_special_tokens=False).input_ids
        return tokenizer(body + "\n" + ANSWER_PREFIX).input_ids

    low, high = 0, 1
    while len(render(high)) <= target_tokens:
        low, high = high, high * 2
    while high - low > 1:  # largest repeat count that fits
        middle = (low + high) // 2
        low, high = (middle, high) if len(render(middle)) <= target_tokens else (low, middle)
    return PasskeySample(render(low), passkey, depth)


def passkey_found(answer: str, passkey: str) -> bool:
    """Whether the first number in the answer is the key."""
    numbers = re.findall(r"\d+", answer)
    return bool(numbers) and numbers[0] == passkey
