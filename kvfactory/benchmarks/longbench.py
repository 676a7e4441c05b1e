"""LongBench v1 predictions under KV-cache compression, following the official ``pred.py`` (and KVCache-Factory's
``run_longbench.py`` where it is the reference), with its choices made explicit:

- templates and generation lengths are data: ``{data_dir}/config/dataset2prompt.json`` and ``dataset2maxlen.json``;
- middle truncation is **token-exact**: the content ids (the filled template, no special tokens) keep their first
  and last ``int(max_length / 2)`` ids; upstream decodes both halves and re-encodes, which is not the identity;
- the model's chat template (its own, as ``apply_chat_template`` renders it) wraps the truncated prompt, except for
  trec, triviaqa, samsum, lsht, lcc and repobench-p; the wrapper's ids are added around the content ids, so the
  input is exactly ``wrapper + truncated content``;
- greedy decoding; stop on every end-of-sequence token the model defines; samsum also stops on a newline and must
  generate at least one token (``min_length = context + 1`` upstream);
- ``max_length`` is ``--max_length``, else the official ``model2maxlen`` entry of the model, else a family default
  (KVCache-Factory's: llama2 3950, llama3 7500, mistral 31500), else ``max_position_embeddings`` minus the
  generation length and the wrapper.

Results: ``{save_dir}/{model}_{C}/{dataset}/{method}.jsonl`` (resumable, see ``ResultsFile``) and
``run_meta_{method}.json`` beside the dataset folders. Scoring: :mod:`kvfactory.metrics.longbench`.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kvfactory.benchmarks.common import (
    Job, ResultsFile, budget_label, ensure_folder, load_model, method_label, model_label, model_stop_token_ids, parse_list,
    patch_parameters, run_jobs,
)
from kvfactory.metrics.longbench import DATASET2METRIC
from kvfactory.paths import REPO_ROOT, shared_data_dir

logger = logging.getLogger(__name__)

#: The 21 LongBench v1 tasks, in the official order.
DATASETS: tuple[str, ...] = tuple(DATASET2METRIC)
#: The 13 tasks with a LongBench-E split (``{name}_e.jsonl``), in ``pred.py`` order.
LONGBENCH_E: tuple[str, ...] = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
                                "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc",
                                "repobench-p")
#: Tasks whose prompt is not wrapped in the chat template (few-shot and code completion).
NO_CHAT_DATASETS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
#: Tasks that also stop on a newline and must generate at least one token.
NEWLINE_STOP_DATASETS = ("samsum",)
#: KVCache-Factory's prompt-length defaults, matched as substrings of the model's folder name (longest key wins).
FAMILY_MAX_LENGTH = {"llama2": 3950, "llama-2": 3950, "llama3": 7500, "llama-3": 7500, "mistral": 31500}
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "LongBench"
CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")
_PROBE = "\x00KVFACTORY-PROMPT\x00"


@dataclass(frozen=True)
class LongBenchConfig:
    """The official prompt templates, generation lengths and (optional) per-model prompt lengths."""

    prompts: dict[str, str]
    max_gen: dict[str, int]
    model_max_length: dict[str, int]


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir``, or ``data/LongBench``, or the shared copy (``{shared}/LongBench``) when the former is absent."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"--data_dir {path} does not exist (fetch the data with scripts/download_longbench.sh)")
        return path
    if DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    shared = shared_data_dir()
    if shared is not None and (shared / "LongBench").is_dir():
        logger.info("using the shared LongBench data in %s", shared / "LongBench")
        return shared / "LongBench"
    raise FileNotFoundError(f"no LongBench data in {DEFAULT_DATA_DIR}: run scripts/download_longbench.sh or pass "
                            "--data_dir")


def load_config(data_dir: Path) -> LongBenchConfig:
    """Read ``config/dataset2prompt.json``, ``config/dataset2maxlen.json`` and, if present, ``model2maxlen.json``."""
    folder = Path(data_dir) / "config"
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (LongBench's config/; scripts/download_longbench.sh "
                                "fetches them with the data)")
    prompts = json.loads((folder / "dataset2prompt.json").read_text(encoding="utf-8"))
    max_gen = json.loads((folder / "dataset2maxlen.json").read_text(encoding="utf-8"))
    model_file = folder / "model2maxlen.json"
    model_max_length = json.loads(model_file.read_text(encoding="utf-8")) if model_file.is_file() else {}
    return LongBenchConfig(prompts, {k: int(v) for k, v in max_gen.items()},
                           {k.lower(): int(v) for k, v in model_max_length.items()})


def select_datasets(text: str | None, longbench_e: bool = False) -> list[str]:
    """The data-file stems to run: ``--datasets a,b`` (default: all 21, or the 13 E splits), ``{name}_e`` for E."""
    allowed = LONGBENCH_E if longbench_e else DATASETS
    chosen = parse_list(text) or list(allowed)
    unknown = [name for name in chosen if name not in allowed]
    if unknown:
        kind = "LongBench-E tasks" if longbench_e else "LongBench tasks"
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; the {kind} are: {', '.join(allowed)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--datasets repeats a name: {text}")
    return [f"{name}_e" if longbench_e else name for name in chosen]


def load_records(data_dir: Path, dataset: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` records of ``{data_dir}/{dataset}.jsonl`` (all when ``None``), checked for the fields the
    runner needs."""
    path = Path(data_dir) / f"{dataset}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in Path(data_dir).glob("*.jsonl"))
        raise FileNotFoundError(f"{path} does not exist; {data_dir} has: {', '.join(present) or 'no .jsonl files'}")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); LongBench files hold one JSON "
                                 "object per line") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a JSON {type(record).__name__}, not an object (LongBench format)")
            missing = [f for f in ("_id", "context", "input", "answers", "length") if f not in record]
            if missing:
                raise ValueError(f"{path}:{number}: record lacks {', '.join(missing)} (LongBench format)")
            records.append(record)
    return records


def middle_truncate(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first and last ``int(max_length / 2)`` ids when there are more than ``max_length`` (``pred.py``)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    half = int(max_length / 2)
    return ids[:half] + ids[-half:]


def split_template(template: str) -> tuple[str, str]:
    """The template cut right after ``{context}``: the context part and the question part (query-agnostic runs)."""
    cut = template.find("{context}")
    if cut < 0:
        raise ValueError(f"template has no {{context}}: {template[:80]!r}")
    cut += len("{context}")
    if "{input}" in template[:cut]:
        raise ValueError("template puts {input} before {context}; it cannot be split into context and question")
    return template[:cut], template[cut:]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _wrapper_ids(tokenizer: Any, rendered: str) -> tuple[list[int], list[int]]:
    prefix, found, suffix = rendered.partition(_PROBE)
    if not found:
        raise ValueError("the prompt wrapper dropped its content; cannot split it around the prompt")
    return (_encode(tokenizer, prefix) if prefix else []), (_encode(tokenizer, suffix) if suffix else [])


@dataclass(frozen=True)
class PromptBuilder:
    """Token-exact prompts: ``prefix + middle_truncate(content) + suffix``.

    ``chat`` is the (prefix, suffix) of the model's chat template around one user message with the generation
    prompt (``None`` when the tokenizer has none); ``plain`` is what ``tokenizer(text)`` adds around any text by
    default (a BOS for Llama, nothing for SmolLM2).
    """

    tokenizer: Any
    chat: tuple[list[int], list[int]] | None
    plain: tuple[list[int], list[int]]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "PromptBuilder":
        chat = None
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                                     add_generation_prompt=True)
            chat = _wrapper_ids(tokenizer, rendered)
        else:
            logger.warning("the tokenizer has no chat template: every prompt is used as plain text")
        probe = _encode(tokenizer, "x")
        with_specials = tokenizer("x", verbose=False)["input_ids"]
        start = next(i for i in range(len(with_specials)) if with_specials[i:i + len(probe)] == probe)
        plain = (with_specials[:start], with_specials[start + len(probe):])
        return cls(tokenizer, chat, plain)

    def wrapper(self, use_chat: bool) -> tuple[list[int], list[int]]:
        return self.chat if use_chat and self.chat is not None else self.plain

    def overhead(self, use_chat: bool) -> int:
        """Ids the wrapper adds around the content."""
        prefix, suffix = self.wrapper(use_chat)
        return len(prefix) + len(suffix)

    def build(self, prompt: str, *, use_chat: bool, max_length: int) -> tuple[list[int], int]:
        """``(input_ids, content_tokens)``: the wrapped, middle-truncated prompt and its untruncated content length."""
        content = _encode(self.tokenizer, prompt)
        prefix, suffix = self.wrapper(use_chat)
        return prefix + middle_truncate(content, max_length) + suffix, len(content)

    def build_split(self, context: str, question: str, *, use_chat: bool, max_length: int
                    ) -> tuple[list[int], list[int], int]:
        """``(context_ids, question_ids, content_tokens)`` for query-agnostic runs: the context alone is middle-
        truncated to what the question leaves of ``max_length``; the wrapper's suffix goes after the question."""
        context_ids, question_ids = _encode(self.tokenizer, context), _encode(self.tokenizer, question)
        room = max_length - len(question_ids)
        if room < 2:
            raise ValueError(f"the question alone has {len(question_ids)} tokens, more than max_length {max_length}")
        prefix, suffix = self.wrapper(use_chat)
        return (prefix + middle_truncate(context_ids, room), question_ids + suffix,
                len(context_ids) + len(question_ids))


def resolve_max_length(model_path: str, max_position_embeddings: int | None, config: LongBenchConfig, max_gen: int,
                       overhead: int, explicit: int | None = None) -> tuple[int, str]:
    """The content-token budget of a prompt and where it came from (``--max_length``, ``model2maxlen``, a family
    default, or ``max_position_embeddings - max_gen - overhead``)."""
    if explicit is not None:
        return explicit, "--max_length"
    label = model_label(model_path)
    if label in config.model_max_length:
        return config.model_max_length[label], "model2maxlen.json"
    family = max((key for key in FAMILY_MAX_LENGTH if key in label), key=len, default=None)
    if family is not None:
        return FAMILY_MAX_LENGTH[family], f"family default ({family})"
    if not max_position_embeddings:
        raise ValueError(f"no prompt length known for {model_path!r} and its config has no max_position_embeddings; "
                         "pass --max_length")
    value = max_position_embeddings - max_gen - overhead
    if value < 2:
        raise ValueError(f"max_position_embeddings {max_position_embeddings} leaves no room for a prompt")
    return value, f"max_position_embeddings {max_position_embeddings} - max_gen {max_gen} - wrapper {overhead}"


def make_jobs(records: Sequence[dict[str, Any]], dataset: str, config: LongBenchConfig, builder: PromptBuilder,
              max_length: int, stop_token_ids: Sequence[int], newline_id: int | None = None,
              query_agnostic: bool = False) -> list[Job]:
    """One job per record of ``dataset`` (a task name or ``{task}_e``), longest prompts first (less padding)."""
    task = dataset[:-2] if dataset.endswith("_e") else dataset
    if task not in config.prompts or task not in config.max_gen:
        raise ValueError(f"the LongBench config has no prompt or max length for {task!r}")
    template, max_gen = config.prompts[task], config.max_gen[task]
    use_chat = task not in NO_CHAT_DATASETS
    stops = list(stop_token_ids)
    min_new_tokens = 0
    if task in NEWLINE_STOP_DATASETS:
        if newline_id is None:
            raise ValueError(f"{task} stops on a newline: pass the tokenizer's newline id")
        stops = sorted({*stops, newline_id})
        min_new_tokens = 1
        if query_agnostic:
            raise ValueError(f"{task} needs min_new_tokens, which query-agnostic answering does not support yet")
    jobs = []
    for record in records:
        stored = {"answers": record["answers"], "all_classes": record.get("all_classes"), "length": record["length"]}
        if query_agnostic:
            context_part, question_part = split_template(template)
            input_ids, question_ids, content = builder.build_split(
                context_part.format(**record), question_part.format(**record), use_chat=use_chat,
                max_length=max_length)
        else:
            input_ids, content = builder.build(template.format(**record), use_chat=use_chat, max_length=max_length)
            question_ids = None
        stored.update(prompt_tokens=content, truncated=content > max_length)
        jobs.append(Job(key=record["_id"], input_ids=input_ids, max_new_tokens=max_gen, stop_token_ids=stops,
                        record=stored, question_ids=question_ids, min_new_tokens=min_new_tokens))
    return sorted(jobs, key=lambda job: -len(job.input_ids))


#: Arguments that change predictions (besides the model's, the method's and the data): a resume must match them.
PROTOCOL_ARGS = ("max_length", "query_agnostic", "max_num_examples")


def data_fingerprint(data_dir: Path, datasets: Sequence[str]) -> dict[str, Any]:
    """Size and SHA-256 of the config files and of each dataset file a run reads (what ``settings["data"]`` holds)."""
    from kvfactory.benchmarks.provenance import file_fingerprint

    found = {f"config/{name}": file_fingerprint(data_dir / "config" / name) for name in CONFIG_FILES}
    if (data_dir / "config" / "model2maxlen.json").is_file():
        found["config/model2maxlen.json"] = file_fingerprint(data_dir / "config" / "model2maxlen.json")
    found.update({f"{dataset}.jsonl": file_fingerprint(data_dir / f"{dataset}.jsonl") for dataset in datasets})
    return found


def run_settings(args: argparse.Namespace, name: str, params: dict[str, Any], data_dir: Path,
                 datasets: Sequence[str]) -> dict[str, Any]:
    """The settings that define a LongBench method's results (see :mod:`kvfactory.benchmarks.provenance`)."""
    from kvfactory.benchmarks.provenance import model_settings

    return {**model_settings(args), "method": name, "params": params,
            **{key: getattr(args, key) for key in PROTOCOL_ARGS}, "data": data_fingerprint(data_dir, datasets)}


def run(args: argparse.Namespace) -> Path:
    """Predict every selected dataset with the method the arguments name; returns the results folder."""
    import kvfactory
    from kvfactory import quant

    if args.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}")
    if args.max_num_examples is not None and args.max_num_examples < 1:
        raise ValueError(f"--max_num_examples must be at least 1, got {args.max_num_examples}")
    name, params = patch_parameters(args)
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max_length must be at least 2, got {args.max_length}")
    kvfactory.methods.get(name, **{k: v for k, v in params.items() if k not in (*quant.QUANT_PARAMETERS, "nbits")})
    data_dir = resolve_data_dir(args.data_dir)
    config = load_config(data_dir)
    datasets = select_datasets(args.datasets, args.longbench_e)
    records = {dataset: load_records(data_dir, dataset, args.max_num_examples) for dataset in datasets}
    label = method_label(name, params)
    folder = ensure_folder(Path(args.save_dir)) / f"{model_label(args.model_path)}_{budget_label(args)}"
    settings = run_settings(args, name, params, data_dir, datasets)
    meta_name = f"run_meta_{label}.json"

    def has_results() -> bool:
        return any(path.stat().st_size for path in folder.glob(f"*/{label}.jsonl"))

    from kvfactory.benchmarks.provenance import record_run

    record_run(folder / meta_name, settings, args=args, has_results=has_results, check_only=True)  # before loading

    model, tokenizer = load_model(args)
    if tokenizer is None:
        raise ValueError(f"{args.model_path!r} has no tokenizer; LongBench needs a real checkpoint")
    builder = PromptBuilder.from_tokenizer(tokenizer)
    stops = model_stop_token_ids(model, tokenizer)
    newline_id = _encode(tokenizer, "\n")[-1]
    lengths = {}
    jobs = {}
    for dataset, dataset_records in records.items():
        task = dataset[:-2] if dataset.endswith("_e") else dataset
        use_chat = task not in NO_CHAT_DATASETS
        max_length, source = resolve_max_length(
            args.model_path, getattr(model.config, "max_position_embeddings", None), config, config.max_gen[task],
            builder.overhead(use_chat), args.max_length)
        lengths[dataset] = {"max_length": max_length, "source": source}
        jobs[dataset] = make_jobs(dataset_records, dataset, config, builder, max_length, stops, newline_id,
                                  args.query_agnostic)
        logger.info("%s: %d samples, max_length %d (%s), %d truncated", dataset, len(dataset_records), max_length,
                    source, sum(job.record["truncated"] for job in jobs[dataset]))
    from kvfactory.benchmarks import distributed

    rank = distributed.context()
    if rank.is_main:  # one run_meta entry per run, however many workers
        record_run(folder / meta_name, settings, args=args, has_results=has_results,
                   extra={"data_dir": str(data_dir), "stop_token_ids": stops, "max_length": lengths,
                          "chat_template": builder.chat is not None, "world_size": rank.world_size})
    with kvfactory.patch(model, name, **params) as handle:
        for dataset, dataset_jobs in jobs.items():
            results = ResultsFile(folder / dataset / f"{label}.jsonl", key="_id")
            run_jobs(model, tokenizer, handle, dataset_jobs, results, batch_size=args.eval_batch_size,
                     description=f"{dataset} {label}")
    distributed.barrier()  # every worker's records are in before rank 0 reports the folder
    return folder
