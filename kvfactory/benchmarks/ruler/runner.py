"""The RULER runner: generate (or replay) each task's samples, answer them with a patched model, score them.

Layout, as KVCache-Factory's RULER runner and the LongBench one::

    {save_dir}/{model}_{C}/run_meta_{method}.json            settings (fixed) and the history of invocations
    {save_dir}/{model}_{C}/{length}/{task}/{method}.jsonl     one line per sample: index, pred, outputs, length, ...
    {save_dir}/{model}_{C}/{length}/{task}/metrics.json       {method: score}
    {save_dir}/{model}_{C}/results.csv                        methods x {length}/{task}, per-length and overall means
    {save_dir}/data/{model}/{template}_seed{seed}/{length}/{task}.jsonl   the generated samples (RULER format)

Generated samples are written in RULER's format (``{"index", "input", "outputs", "length"}``) and reused when the
file already holds exactly ``num_samples`` lines (``prepare.py``'s rule); ``--data_dir`` replays such files instead
(KVCache-Factory's ``data/RULER/{length}/{task}.jsonl`` or RULER's ``{length}/{task}/validation.jsonl``). Results
files are resumable: a rerun answers only the samples that are missing.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfactory.benchmarks.common import (
    Job, ResultsFile, budget_label, ensure_folder, load_model, method_label, model_label, model_stop_token_ids,
    parse_list, patch_parameters, run_jobs,
)
from kvfactory import methods
from kvfactory.benchmarks import distributed
from kvfactory.benchmarks.provenance import file_fingerprint, model_settings, record_run

from kvfactory.quant import QUANT_PARAMETERS

from . import MissingTaskData, TASKS, generate, read_jsonl, write_jsonl
from .constants import MODEL_TEMPLATES, tokens_to_generate
from .essays import default_essays_dir, sentence_splitter_source

__all__ = [
    "CHAT", "REPLAY_LAYOUTS", "add_ruler_arguments", "parse_tasks", "parse_lengths", "chat_wrapper",
    "resolve_template", "replay_file", "task_samples", "sample_jobs", "RulerRun", "run_ruler",
]

logger = logging.getLogger(__name__)

#: ``--template chat``: the tokenizer's own chat template around the task (answer prefix in the assistant turn).
CHAT = "chat"
#: Where ``--data_dir`` looks for one task's file, in order (KVCache-Factory's layout, then RULER's).
REPLAY_LAYOUTS = ("{length}/{task}.jsonl", "{length}/{task}/validation.jsonl")
DEFAULT_NUM_SAMPLES = 500  # RULER's config_tasks.sh
_PLACEHOLDER = "\x00RULER_TASK\x00"


def add_ruler_arguments(parser: argparse.ArgumentParser) -> None:
    """The RULER group: lengths, tasks, samples, data sources, template, generation and output options."""
    group = parser.add_argument_group("RULER")
    group.add_argument("--context_lengths", default="4096",
                       help="comma-separated target lengths in tokens (prompt + tokens_to_generate), any values")
    group.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of: {', '.join(TASKS)}")
    group.add_argument("--num_samples", type=int, default=None,
                       help=f"samples per task (default: {DEFAULT_NUM_SAMPLES} generated, every line replayed)")
    group.add_argument("--data_dir", default=None,
                       help="replay RULER-format JSONL files from here ({length}/{task}.jsonl or "
                            "{length}/{task}/validation.jsonl) instead of generating")
    group.add_argument("--haystack_dir", default=None,
                       help="Paul Graham essays folder (*.txt) for the essay tasks (default: shared data)")
    group.add_argument("--qa_data", default=None,
                       help="folder with squad.json / hotpotqa.json for qa_1 / qa_2 (skipped without it)")
    group.add_argument("--template", default="base",
                       help=f"RULER model template ({', '.join(MODEL_TEMPLATES)}) or '{CHAT}' for the tokenizer's "
                            "chat template; used when generating")
    group.add_argument("--remove_newline_tab", action="store_true", help="RULER's --remove_newline_tab")
    group.add_argument("--tokenizer_path", default=None, help="tokenizer checkpoint (default: the model's)")
    group.add_argument("--max_new_tokens", type=int, default=None,
                       help="override RULER's per-task tokens_to_generate (niah 128, vt 30, cwe 120, fwe 50, qa 32)")
    group.add_argument("--eval_batch_size", type=int, default=1, help="samples answered together (left padding)")
    group.add_argument("--save_dir", default="results_ruler", help="root of the results folders")


def parse_tasks(text: str) -> list[str]:
    """``"vt,cwe"`` → ``["vt", "cwe"]``; ``all`` is every task. Unknown names are an error listing the accepted."""
    tasks = list(TASKS) if text.strip() == "all" else parse_list(text)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown) or '(none given)'}; accepted: all or "
                         f"{', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def parse_lengths(text: str) -> list[int]:
    """``"4096,8192"`` → ``[4096, 8192]``; every value must be a positive integer."""
    try:
        lengths = parse_list(text, int)
    except ValueError as error:
        raise ValueError(f"--context_lengths takes comma-separated positive integers, got {text!r}") from error
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"--context_lengths takes comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(lengths))


def chat_wrapper(tokenizer: Any) -> str:
    """The tokenizer's chat template as a RULER model wrapper: one user turn holding ``{task_template}``, then the
    generation prompt (so RULER's answer prefix opens the assistant turn, as with ``meta-llama3``).

    Raises
    ------
    ValueError
        When the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--template {CHAT} needs a tokenizer with a chat template; this one has none (use one of "
                         f"{', '.join(MODEL_TEMPLATES)})")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                         add_generation_prompt=True)
    return text.replace(_PLACEHOLDER, "{task_template}")


def resolve_template(template: str, tokenizer: Any) -> str:
    """A RULER model-template name, or the chat wrapper for ``chat``; anything else is an error."""
    if template == CHAT:
        return chat_wrapper(tokenizer)
    if template not in MODEL_TEMPLATES:
        raise ValueError(f"unknown --template {template!r}; accepted: {CHAT}, {', '.join(MODEL_TEMPLATES)}")
    return template


def replay_file(data_dir: str | Path, length: int, task: str) -> Path | None:
    """The RULER-format file for ``(length, task)`` under ``data_dir`` (see :data:`REPLAY_LAYOUTS`), if any."""
    for layout in REPLAY_LAYOUTS:
        path = Path(data_dir) / layout.format(length=length, task=task)
        if path.is_file():
            return path
    return None


def _check_records(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    seen: set[Any] = set()
    for number, record in enumerate(records, start=1):
        outputs = record.get("outputs")
        if isinstance(outputs, str):
            record["outputs"] = outputs = [outputs]
        problem = None
        if "index" not in record or record["index"] in seen:
            problem = "a missing or repeated index"
        elif not isinstance(record.get("input"), str) or not record["input"]:
            problem = "no input string"
        elif not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            problem = "outputs must be a non-empty list of strings"
        if problem:
            raise ValueError(f"{path}: record {number} is not a RULER sample ({problem}); expected "
                             '{"index", "input", "outputs", "length"}')
        seen.add(record["index"])
    return records


def task_samples(task: str, length: int, tokenizer: Any, args: argparse.Namespace, template: str,
                 data_root: Path) -> tuple[list[dict[str, Any]], Path]:
    """The samples of one ``(task, length)`` and the file they come from.

    With ``args.data_dir`` the RULER-format file is replayed (first ``num_samples`` lines when given); otherwise
    the samples are generated for ``tokenizer`` into ``data_root/{length}/{task}.jsonl``, reused when that file
    already holds exactly ``num_samples`` lines.

    Raises
    ------
    MissingTaskData
        The replay file, essays or QA data are missing (the caller skips the task).
    """
    if args.data_dir:
        path = replay_file(args.data_dir, length, task)
        if path is None:
            tried = ", ".join(str(Path(args.data_dir) / layout.format(length=length, task=task))
                              for layout in REPLAY_LAYOUTS)
            raise MissingTaskData(f"no RULER file to replay (tried {tried})")
        records = _check_records(read_jsonl(path), path)
        return (records if args.num_samples is None else records[: args.num_samples]), path
    num_samples = DEFAULT_NUM_SAMPLES if args.num_samples is None else args.num_samples
    path = data_root / str(length) / f"{task}.jsonl"
    if path.is_file():
        records = read_jsonl(path)
        if len(records) == num_samples:
            logger.info("%s: reusing %d generated samples", path, num_samples)
            return _check_records(records, path), path
    essays = args.haystack_dir if args.haystack_dir else default_essays_dir()
    records = generate(task, tokenizer, length, num_samples, seed=args.seed, essays_dir=essays,
                       qa_data=args.qa_data, template=template, remove_newline_tab=args.remove_newline_tab)
    write_jsonl(records, path)
    return records, path


def sample_jobs(records: list[dict[str, Any]], tokenizer: Any, task: str, stop_token_ids: list[int],
                max_new_tokens: int | None, results: ResultsFile) -> list[Job]:
    """One :class:`Job` per sample not yet in ``results``: the input tokenized as RULER's HF client does (the
    tokenizer's own special tokens added), ``tokens_to_generate`` new tokens unless overridden."""
    budget = tokens_to_generate(task) if max_new_tokens is None else max_new_tokens
    return [Job(key=record["index"], input_ids=tokenizer(record["input"]).input_ids, max_new_tokens=budget,
                stop_token_ids=stop_token_ids,
                record={"outputs": record["outputs"], "length": record.get("length")})
            for record in records if not results.done(record["index"])]


@dataclass
class RulerRun:
    """What :func:`run_ruler` did: the run folder, scores, wall time and answers per method, skipped tasks."""

    run_dir: Path
    scores: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _method_namespaces(args: argparse.Namespace) -> list[argparse.Namespace]:
    names = parse_list(args.method)
    if not names:
        raise ValueError("--method needs at least one method name")
    out = []
    for name in dict.fromkeys(names):
        one = copy.copy(args)
        one.method = name
        name, params = patch_parameters(one)  # an unknown method or a bad flag fails before any work
        methods.get(name, **{k: v for k, v in params.items() if k not in (*QUANT_PARAMETERS, "nbits")})
        out.append(one)
    return out


#: RULER flags that change samples or answers: a resume must match them.
PROTOCOL_ARGS = ("num_samples", "template", "remove_newline_tab", "tokenizer_path", "max_new_tokens", "qa_data")


def run_settings(args: argparse.Namespace, name: str, params: dict[str, Any],
                 data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings that define a RULER method's results; ``data`` maps ``{length}/{task}`` to its sample file's
    size and SHA-256 (see :mod:`kvfactory.benchmarks.provenance`)."""
    return {**model_settings(args), "method": name, "params": params,
            **{key: getattr(args, key) for key in PROTOCOL_ARGS}, "data": data or {}}


def _has_results(run_dir: Path, method: str) -> bool:
    return any(path.stat().st_size for path in run_dir.glob(f"*/*/{method}.jsonl"))


def run_ruler(args: argparse.Namespace, model: Any = None, tokenizer: Any = None) -> RulerRun:
    """Run every method of ``args.method`` (comma-separated) on every (length, task), then score the run folder.

    ``model`` / ``tokenizer`` default to what the model arguments name. Tasks whose data is missing (no essays, no
    ``--qa_data``, no replay file) are skipped with a logged reason, reported in :attr:`RulerRun.skipped`.
    """
    import kvfactory

    lengths, tasks = parse_lengths(args.context_lengths), parse_tasks(args.tasks)
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {args.num_samples}")
    per_method = _method_namespaces(args)
    run_dir = ensure_folder(Path(args.save_dir)) / f"{model_label(args.model_path)}_{budget_label(args)}"
    for method_args in per_method:  # refuse a resume with other settings before any work
        name, params = patch_parameters(method_args)
        method = method_label(name, params)
        record_run(run_dir / f"run_meta_{method}.json", run_settings(args, name, params), args=args,
                   has_results=lambda: _has_results(run_dir, method), check_only=True)
    if model is None:
        model, tokenizer = load_model(args)
    if args.tokenizer_path:
        from kvfactory.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_path)
    if tokenizer is None:
        raise ValueError(f"{args.model_path} comes without a tokenizer: pass --tokenizer_path")
    template = resolve_template(args.template, tokenizer)
    label = model_label(args.tokenizer_path or args.model_path)
    data_root = Path(args.save_dir) / "data" / label / f"{args.template}_seed{args.seed}"
    stops = model_stop_token_ids(model, tokenizer)

    samples: dict[tuple[int, str], list[dict[str, Any]]] = {}
    sources: dict[str, Any] = {}
    run = RulerRun(run_dir=run_dir, scores={})
    for length in lengths:
        for task in tasks:
            try:
                records, path = task_samples(task, length, tokenizer, args, template, data_root)
            except MissingTaskData as error:
                run.skipped[f"{length}/{task}"] = str(error)
                logger.warning("RULER %s at %d skipped: %s", task, length, error)
                continue
            logger.info("RULER %s at %d: %d samples from %s", task, length, len(records), path)
            samples[(length, task)] = records
            sources[f"{length}/{task}"] = file_fingerprint(path)

    for method_args in per_method:
        name, params = patch_parameters(method_args)
        method = method_label(name, params)
        if distributed.is_main():  # one run_meta entry per run, however many workers
            record_run(run_dir / f"run_meta_{method}.json", run_settings(args, name, params, sources), args=args,
                       has_results=lambda: _has_results(run_dir, method),
                       extra={"ruler_template": template, "stop_token_ids": stops,
                              "sentence_splitter": sentence_splitter_source(),
                              "world_size": distributed.context().world_size})
        started, answered = time.perf_counter(), 0
        with kvfactory.patch(model, name, **params) as handle:
            for (length, task), records in samples.items():
                results = ResultsFile(run_dir / str(length) / task / f"{method}.jsonl", key="index")
                jobs = sample_jobs(records, tokenizer, task, stops, args.max_new_tokens, results)
                answered += run_jobs(model, tokenizer, handle, jobs, results, batch_size=args.eval_batch_size,
                                     key_field="index", description=f"{method} {length} {task}")
        run.seconds[method] = round(time.perf_counter() - started, 1)
        run.generated[method] = answered
        logger.info("%s: %d answers in %.1fs", method, answered, run.seconds[method])

    distributed.barrier()  # every worker's answers are in before rank 0 scores
    if samples and distributed.is_main():  # metrics.json written once
        from kvfactory.metrics.ruler import score_results

        run.scores = score_results(run_dir)
    return run
