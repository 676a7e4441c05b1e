"""Needle-in-a-haystack, model-free, part 2 of 3: the prompt around the context, as token ids.

Holds the question (:data:`RETRIEVAL_QUESTION`, or KVCF's cue :data:`KVCF_RETRIEVAL_QUESTION`), the instruction and
the prompt's token ids before and after the context (:func:`prompt_parts`, :func:`prompt_overhead`,
:func:`build_prompt_ids`). The haystack and the needle inside it are in :mod:`kvfactory.benchmarks.needle_haystack`
(whose docstring describes the protocol followed); scoring and result files in
:mod:`kvfactory.benchmarks.needle_scoring`.

The prompt is assembled from token ids (template prefix + context ids + template suffix), never decoded and
re-encoded, so together with :func:`~kvfactory.benchmarks.needle_haystack.build_context` it has exactly
``context_length`` tokens. What differs from upstream on purpose:

Differs
    - **The question**, :data:`RETRIEVAL_QUESTION`, is gkamradt's "What is the best thing to do in San Francisco?",
      not KVCF's completion cue ``"The best thing to do in San Francisco is: "``. Prompts go through the model's
      chat template, where the user turn is a request and the assistant turn starts fresh: a question is what an
      instruct model is trained to answer there, while a dangling sentence fragment as the user's message is not
      continued by the assistant turn the way it is in KVCF's raw ``Question: ...\\nAnswer:`` completion prompt.
      The plain fallback prompt (no chat template) ends with an ``Answer:`` cue.
      :data:`KVCF_RETRIEVAL_QUESTION` is there for parity runs.
    - **An optional answer prefix** (``answer_prefix``, e.g. :data:`SF_ANSWER_PREFIX`) starts the assistant turn, the
      way RULER appends its ``answer_prefix`` to the template, gkamradt's Anthropic prompt ends in "Here is the most
      relevant sentence in the context:" and kvfactory's passkey prompt ends in "The pass key is". Off by default.
      It matters for query-aware methods: SnapKV's observation window is the prompt's last ``W`` tokens, which
      without a prefix are mostly the chat template's ``?<|im_end|>\n<|im_start|>assistant\n``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "RETRIEVAL_QUESTION", "KVCF_RETRIEVAL_QUESTION", "SF_ANSWER_PREFIX", "PromptParts", "prompt_parts", "prompt_overhead",
    "build_prompt_ids", "has_chat_template",
]

logger = logging.getLogger(__name__)

RETRIEVAL_QUESTION = "What is the best thing to do in San Francisco?"
"""gkamradt's retrieval question (used here; see the module docstring for why not KVCF's cue)."""

KVCF_RETRIEVAL_QUESTION = "The best thing to do in San Francisco is: "
"""KVCache-Factory's completion cue, for parity runs with its raw (non-chat) prompt."""

SF_ANSWER_PREFIX = "The best thing to do in San Francisco is"
"""An answer prefix for the default needle and question (``--answer_prefix``); the answer scored is what follows it."""

CONTEXT_OPEN = "<document>"
CONTEXT_CLOSE = "</document>"
INSTRUCTION = ("Below is a long document. Read it, then answer the question that follows it, using only the "
               "information in the document. Keep the answer short: one sentence.")
_PLACEHOLDER = "@@KVFACTORY_NEEDLE_CONTEXT@@"


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


def _plain_prompt(question: str, context: str, answer_prefix: str = "") -> str:
    return f"{_user_message(question, context)}\nAnswer:" + (f" {answer_prefix}" if answer_prefix else "")


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
                 system_prompt: str | None = None, answer_prefix: str = "") -> PromptParts:
    """The prompt around the context, as ids.

    With a chat template (and ``use_chat_template``): one user turn (after ``system_prompt`` when given; otherwise
    whatever default system turn the template adds) holding :data:`INSTRUCTION`, the context between
    ``<document>`` / ``</document>`` lines, then ``Question: {question}``; ``add_generation_prompt=True``. The template
    is rendered once with a placeholder for the context and each side is encoded with ``add_special_tokens=False``
    (as ``apply_chat_template`` does; templates write their own BOS). A non-empty ``answer_prefix`` follows the
    generation prompt, so the assistant turn starts with it.

    Without one: the same user text followed by ``\\nAnswer:`` (and `` {answer_prefix}``), after the tokenizer's
    default leading special tokens (BOS), like a plain ``tokenizer(prompt)``.
    """
    if use_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": _user_message(question, _PLACEHOLDER)}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
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
    before, after = _plain_prompt(question, _PLACEHOLDER, answer_prefix).split(_PLACEHOLDER)
    prefix = _leading_special_ids(tokenizer) + list(tokenizer.encode(before, add_special_tokens=False))
    suffix = list(tokenizer.encode(after, add_special_tokens=False))
    return PromptParts(tuple(prefix), tuple(suffix), chat_template=False)


def prompt_overhead(tokenizer: Any, question: str = RETRIEVAL_QUESTION, *, use_chat_template: bool = True,
                    system_prompt: str | None = None, answer_prefix: str = "") -> int:
    """Tokens the prompt adds around the context: pass it to :func:`build_context` as ``prompt_overhead_tokens``."""
    return prompt_parts(tokenizer, question, use_chat_template=use_chat_template, system_prompt=system_prompt,
                        answer_prefix=answer_prefix).overhead


def build_prompt_ids(tokenizer: Any, context_ids: Sequence[int], question: str = RETRIEVAL_QUESTION,
                     use_chat_template: bool = True, *, system_prompt: str | None = None,
                     answer_prefix: str = "") -> list[int]:
    """The full prompt ids: :func:`prompt_parts` around ``context_ids`` (length = overhead + ``len(context_ids)``).

    Together with :func:`build_context` (given ``prompt_overhead_tokens=prompt_overhead(...)`` with the same
    arguments) the result has exactly ``context_length`` tokens.
    """
    parts = prompt_parts(tokenizer, question, use_chat_template=use_chat_template, system_prompt=system_prompt,
                         answer_prefix=answer_prefix)
    return parts.assemble(context_ids)
