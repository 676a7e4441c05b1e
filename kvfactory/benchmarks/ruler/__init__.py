"""RULER (hsiehjackson/RULER @ e40fae1) synthetic data, regenerated offline.

>>> from kvfactory.benchmarks import ruler
>>> records = ruler.generate("niah_single_2", tokenizer, 4096, 500, essays_dir="../shared/data/PaulGrahamEssays")
>>> ruler.write_jsonl(records, "data/RULER/4096/niah_single_2.jsonl")

Each record is ``{"index", "input", "outputs", "length"}`` exactly as RULER's ``prepare.py`` writes it: the answer
prefix is part of ``input`` and ``length = tokens(input) + tokens_to_generate`` (vt adds its example's tokens).
The tokenizer only counts tokens (see :mod:`kvfactory.benchmarks.ruler.common` for the accepted shapes); samples
depend on it, because the length search consumes random draws. Same arguments, same records, byte for byte.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .common import MissingTaskData, SampleDoesNotFit, TokenCounter, as_token_counter, read_jsonl, write_jsonl
from .constants import MODEL_TEMPLATES, SYNTHETIC, TASKS, build_template, task_config, tokens_to_generate
from .essays import default_essays_dir, essay_words, sent_tokenize, sentence_splitter_source

__all__ = [
    "TASKS", "MODEL_TEMPLATES", "SYNTHETIC", "generate", "write_jsonl", "read_jsonl", "MissingTaskData",
    "SampleDoesNotFit", "TokenCounter", "as_token_counter", "tokens_to_generate", "essay_words", "sent_tokenize",
    "sentence_splitter_source", "default_essays_dir", "needs_essays", "needs_qa_data",
]

logger = logging.getLogger(__name__)


def needs_essays(task: str) -> bool:
    """Whether a task's haystack is the Paul Graham essays."""
    config = task_config(task)
    return config["task"] == "niah" and config["args"]["type_haystack"] == "essay"


def needs_qa_data(task: str) -> bool:
    """Whether a task reads SQuAD/HotpotQA (qa_1, qa_2)."""
    return task_config(task)["task"] == "qa"


def generate(
    task: str,
    tokenizer: Any,
    max_seq_length: int,
    num_samples: int,
    *,
    seed: int = 42,
    essays_dir: str | Path | None = None,
    qa_data: str | Path | None = None,
    template: str = "base",
    remove_newline_tab: bool = False,
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` records of one RULER task, as ``prepare.py --task {task}`` would.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    tokenizer : object
        Counts tokens without special tokens: a Hugging Face tokenizer (``len(tokenize(text))`` as RULER's ``hf``),
        an object with ``count_tokens(text)`` or ``encode(text, add_special_tokens=False)``, or ``f(text) -> int``.
    max_seq_length : int
        Target length: prompt tokens + tokens_to_generate (fwe may exceed it, as upstream).
    num_samples : int
        Records to generate (RULER's default is 500).
    seed : int
        RULER's ``random_seed`` (42 + chunk index upstream).
    essays_dir : str or Path, optional
        Folder of the Paul Graham essays (``*.txt``) for essay-haystack niah tasks; defaults to
        ``{shared data}/PaulGrahamEssays`` when that exists.
    qa_data : str or Path, optional
        Folder with ``squad.json`` / ``hotpotqa.json`` for qa_1 / qa_2.
    template : str
        Model template name (:data:`MODEL_TEMPLATES`; KVCache-Factory's files use ``base``) or a wrapper string
        with ``{task_template}`` (e.g. the model's chat template, :func:`~.runner.chat_wrapper`). RULER's niah
        singularisation rewrites a named template whole (wrapper included, as upstream); a wrapper string's text
        before the task is left alone (a system prompt's "You are" stays).
    remove_newline_tab : bool
        RULER's ``--remove_newline_tab``.

    Raises
    ------
    MissingTaskData
        Essays or QA data needed but not available (a runner can skip the task).
    KeyError
        Unknown task or template.
    ValueError
        A wrapper string with other braces, or bad lengths.
    """
    config = task_config(task)
    if max_seq_length <= 0 or num_samples < 0:
        raise ValueError(f"need max_seq_length > 0 and num_samples >= 0 (got {max_seq_length}, {num_samples})")
    count = as_token_counter(tokenizer)
    generator, args = config["task"], config["args"]
    full_template = build_template(generator, template)
    common = dict(args=args, template=full_template, count=count, max_seq_length=int(max_seq_length),
                  tokens_to_generate=int(config["tokens_to_generate"]), num_samples=int(num_samples), seed=int(seed),
                  remove_newline=remove_newline_tab)
    started = time.perf_counter()
    if generator == "niah":
        from .niah import generate_niah

        haystack = None
        if args["type_haystack"] == "essay":
            haystack = essay_words(essays_dir if essays_dir is not None else default_essays_dir())
        records = generate_niah(haystack=haystack, protect_wrapper=template not in MODEL_TEMPLATES, **common)
    elif generator == "variable_tracking":
        from .variable_tracking import generate_variable_tracking

        records = generate_variable_tracking(**common)
    elif generator == "common_words_extraction":
        from .common_words import generate_common_words

        records = generate_common_words(**common)
    elif generator == "freq_words_extraction":
        from .freq_words import generate_freq_words

        records = generate_freq_words(**common)
    else:
        from .qa import generate_qa

        records = generate_qa(qa_data=qa_data, **common)
    logger.info("RULER %s @ %d: %d samples in %.2fs", task, max_seq_length, len(records),
                time.perf_counter() - started)
    return records
