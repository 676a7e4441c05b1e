"""RULER's variable-tracking generator (``synthetic/variable_tracking.py``, task ``vt``).

Kept quirks (all upstream, e40fae1): the one-shot example is always on; it is generated first (target 500 tokens,
increments of 5 noises, 3-letter names) from a template stripped of the model wrapper by dropping the last
whitespace-separated word before the answer prefix (with ``base`` that word is ``above.``) and collapsing
whitespace; it is inserted as ``" " + example + " " + answers + "\\n\\n" + "\\n\\n"`` before the task text; the
search counts ``input + " " + str(answer_list)``; ``length`` is counted before the insertion (tokens +
tokens_to_generate + example tokens); the per-sample retry re-draws at the searched size (the decrement is unused).
"""
from __future__ import annotations

import logging
import string
from typing import Any, Callable

from .common import Rngs, SampleDoesNotFit, remove_newline_tab
from .constants import NOISE, TASK_TEMPLATES

__all__ = ["generate_variable_tracking", "strip_model_template"]

logger = logging.getLogger(__name__)
_TASK = TASK_TEMPLATES["variable_tracking"]
#: Re-draws of one sample before giving up (upstream retries forever).
MAX_RETRIES = 1000


def strip_model_template(template: str) -> str:
    """The one-shot example's template: model wrapper removed, last word before the answer prefix dropped."""
    cutoff = template.index(_TASK["template"][:20])
    cutoff_ans = template.index(_TASK["answer_prefix"][:10])
    return " ".join(template[cutoff:cutoff_ans].split()[:-1]) + template[cutoff_ans:]


def _chains(rngs: Rngs, num_chains: int, num_hops: int, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    rng = rngs.py
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    variables, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        these = names[i:i + num_hops + 1]
        variables.append(these)
        chain = [f"VAR {these[0]} = {rngs.numpy.randint(10000, 99999)}"]
        for j in range(num_hops):
            if j + 1 >= len(these):  # a re-drawn duplicate name left a partial chain: upstream IndexError
                raise IndexError("variable chain shorter than num_hops + 1 (duplicate names re-drawn)")
            chain.append(f"VAR {these[j + 1]} = VAR {these[j]} ")
        chains.append(chain)
    return variables, chains


def _input_output(rngs: Rngs, template: str, num_noises: int, num_chains: int, num_hops: int,
                  is_icl: bool) -> tuple[str, list[str]]:
    variables, chains = _chains(rngs, num_chains, num_hops, is_icl)
    noise = NOISE + "\n"
    sentences = [noise] * num_noises
    if len(sentences) <= len(chains[0]):
        sentences = [piece + "." if len(piece.strip()) > 0 else piece
                     for item in sentences for piece in item.split(".")]
        if len(sentences) <= len(chains[0]):
            logger.warning("vt: not enough noise; chains shortened")
            chains = [chain[:len(sentences) - 1] for chain in chains]
    for chain in chains:
        positions = sorted(rngs.py.sample(range(len(sentences)), len(chain)))
        for j, position in enumerate(positions):
            sentences.insert(position + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    if is_icl:
        template = strip_model_template(template)
    value = chains[0][0].split("=")[-1].strip()
    return template.format(context=context, query=value, num_v=num_hops + 1), variables[0]


def _samples(rngs: Rngs, template: str, count: Callable[[str], int], max_seq_length: int, tokens_to_generate: int,
             num_samples: int, num_chains: int, num_hops: int, incremental: int, icl: dict[str, Any] | None,
             remove_newline: bool) -> list[dict[str, Any]]:
    is_icl = icl is None
    example, example_tokens = "", 0
    if icl is not None:
        example = icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n"
        example_tokens = count(example)

    num_noises, total = incremental, 0
    while total + tokens_to_generate + example_tokens < max_seq_length:
        text, answer = _input_output(rngs, template, num_noises, num_chains, num_hops, is_icl)
        total = count(text + f" {answer}")
        if total + tokens_to_generate + example_tokens > max_seq_length:
            num_noises -= incremental
            break
        num_noises += incremental
    if num_noises <= 0:
        raise SampleDoesNotFit(f"vt: max_seq_length={max_seq_length} is too short for {incremental} noises")

    records = []
    for index in range(num_samples):
        for _ in range(MAX_RETRIES):
            try:
                text, answer = _input_output(rngs, template, num_noises, num_chains, num_hops, is_icl)
            except IndexError:
                continue
            length = count(text) + tokens_to_generate + example_tokens
            if length <= max_seq_length:
                break
        else:
            raise SampleDoesNotFit(f"vt sample {index} does not fit max_seq_length={max_seq_length}")
        if icl is not None:
            cutoff = text.index(_TASK["template"][:20])
            text = text[:cutoff] + " " + example + "\n\n" + text[cutoff:]
        if remove_newline:
            text = remove_newline_tab(text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length})
    return records


def generate_variable_tracking(
    args: dict[str, Any], template: str, count: Callable[[str], int], max_seq_length: int, tokens_to_generate: int,
    num_samples: int, seed: int, remove_newline: bool = False,
) -> list[dict[str, Any]]:
    """Samples of ``vt``: the one-shot example first (500-token target), then the task samples, one RNG stream."""
    rngs = Rngs(seed)
    chains, hops = int(args.get("num_chains", 1)), int(args.get("num_hops", 4))
    icl = _samples(rngs, template, count, 500, tokens_to_generate, 1, chains, hops, 5, None, remove_newline)[0]
    return _samples(rngs, template, count, max_seq_length, tokens_to_generate, num_samples, chains, hops, 10, icl,
                    remove_newline)
