"""Latency and memory of one configuration, measured the same way for FullKV, every method and the unpatched model.

A run = a prefill forward then ``new_tokens - 1`` greedy decode steps, each timed on its own:

- ``prefill_seconds``: the decoder stack on the whole prompt (compression included);
- ``ttft_seconds``: prefill plus the LM head on the last position only and the argmax (the first token exists), so
  the cost of a full-vocabulary logits tensor does not hide the attention's;
- ``tpot_seconds``: the median decode step (decoder + head + argmax); ``total_seconds`` = TTFT + all steps;
- memory: ``cache_bytes`` (the cache's real bytes, :func:`kvfactory.cache_nbytes`) and two peaks of a run:

  - ``peak_memory_over_start_bytes``: the most tensor bytes the run held at once beyond what existed when it started
    (weights excluded), counted as :mod:`kvfactory.benchmarks.memory` counts them (``peak_memory_how``): CUDA
    ``max_memory_allocated`` minus the allocated bytes at the start, in the timed runs; on CPU the live tensor
    storages the run creates, in one extra **untimed** run per configuration (the counting slows every operator).
    It grows with the context by at least the KV bytes and drops with the cache a method saves, whatever ran
    before in the process;
  - ``peak_memory_bytes``: CUDA ``max_memory_allocated``, or on CPU the process's peak RSS (VmHWM, reset before each
    run through ``/proc/self/clear_refs``; where that is not possible, the lifetime ``ru_maxrss`` and
    ``peak_memory_resettable`` says so). RSS only rises when the allocator needs new pages, so after earlier large
    runs it may not move at all: a coarse process figure, not a per-run one.

The unpatched baseline uses transformers' ``DynamicCache`` (what ``generate`` uses), or legacy tuples for GPT-NeoX
in 4.44.2. :func:`compare` runs several configurations round-robin (warm-up, then repeat r of every configuration
before repeat r+1), so every ratio to FullKV is taken side by side; :func:`sweep` does it per context length; the
CLI is ``python run_speed.py`` (repository root).
"""
from __future__ import annotations

import gc
import json
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache

from kvfactory.benchmarks.memory import CPU_COUNT, CUDA_COUNT, TensorMemoryTracker
from kvfactory.cache import CompressedCache, cache_nbytes

UNPATCHED = "unpatched"
RATIO_COLUMNS = ("prefill_speedup", "ttft_speedup", "tpot_speedup", "throughput_ratio", "cache_bytes_ratio",
                 "peak_memory_ratio", "peak_memory_over_start_ratio")
RSS_COUNT = "cpu process rss over start (VmHWM)"  # peak_memory_how when no tensors were counted (track_memory=False)


@dataclass
class SpeedResult:
    """One measured configuration (seconds, bytes, tokens). Times are medians over repeats, peaks the maximum."""

    method: str
    context_length: int
    batch_size: int
    new_tokens: int
    prefill_seconds: float  # decoder stack on the prompt
    tpot_seconds: float  # median decode step
    decode_seconds: float  # all decode steps
    throughput_tokens_per_second: float  # generated tokens / (TTFT + decode), whole batch
    prefill_cache_bytes: int  # right after prefill
    cache_bytes: int  # after the last step
    kept_tokens: float  # mean per layer and head after prefill
    peak_memory_bytes: int  # CUDA max allocated, or the process's peak RSS on CPU (see the module docstring)
    step_seconds: list[float] = field(default_factory=list, repr=False)
    ttft_seconds: float = 0.0  # prefill + LM head on the last position + argmax
    total_seconds: float = 0.0  # TTFT + decode
    peak_memory_over_start_bytes: int = 0  # most tensor bytes held beyond the start (see peak_memory_how)
    peak_memory_resettable: bool = True  # False: CPU peak is the process lifetime's (ru_maxrss)
    peak_memory_how: str = ""  # how peak_memory_over_start_bytes was counted (memory.CUDA_COUNT, CPU_COUNT, RSS_COUNT)
    label: str = ""  # the configuration's name in a comparison (default: method)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("step_seconds")
        return row


@dataclass
class RunTiming:
    """One timed run: seconds, the cache it left, kept tokens and bytes after prefill, and memory."""

    prefill: float
    ttft: float
    steps: list[float]
    cache: Any
    kept: list[float] | None
    prefill_bytes: int
    final_bytes: int
    peak: int
    start: int
    resettable: bool
    tensor_peak: int | None = None  # tensor bytes over the start (CUDA counter; CPU only in a tracked run)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA; a no-op on CPU), so that a clock read after it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_memory(device: torch.device) -> tuple[int, bool]:
    """Reset the peak counter; returns (bytes in use now, whether the peak could be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        resettable = True
    except OSError:
        resettable = False
    rss = _proc_status_kib("VmRSS")
    return (rss or 0) * 1024, resettable


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fresh_cache(model: Any) -> Any:
    handle = getattr(model, "_kvfactory_handle", None)
    if handle is not None:
        return handle.new_cache()
    return DynamicCache() if getattr(model, "_supports_cache_class", False) else None


def run_timed(model: Any, input_ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None = None,
              track_tensors: bool = False) -> RunTiming:
    """Prefill then ``new_tokens - 1`` greedy decode steps, every part timed (see the module docstring).
    ``tensor_peak`` is the CUDA counter's peak over the start; on CPU it is counted only with ``track_tensors``
    (a :class:`~kvfactory.benchmarks.memory.TensorMemoryTracker` over the run, whose times are then not usable)."""
    if not track_tensors or input_ids.device.type != "cpu":
        run = _run(model, input_ids, new_tokens, attention_mask)
        if input_ids.device.type == "cuda":
            run.tensor_peak = run.peak - run.start
        return run
    gc.collect()
    with TensorMemoryTracker() as tracker:
        run = _run(model, input_ids, new_tokens, attention_mask)
    run.tensor_peak = tracker.peak
    return run


@torch.no_grad()
def _run(model: Any, input_ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None) -> RunTiming:
    device = input_ids.device
    decoder, head = model.base_model, model.get_output_embeddings()
    gc.collect()
    start, resettable = _reset_peak_memory(device)
    synchronize(device)
    started = time.perf_counter()
    output = decoder(input_ids, attention_mask=attention_mask, past_key_values=_fresh_cache(model), use_cache=True)
    synchronize(device)
    prefill = time.perf_counter() - started
    token = head(output.last_hidden_state[:, -1:]).argmax(-1)
    synchronize(device)
    ttft = time.perf_counter() - started
    cache = output.past_key_values
    kept = cache.mean_kept_tokens() if isinstance(cache, CompressedCache) else None
    prefill_bytes = cache_nbytes(cache)
    steps = []
    for _ in range(new_tokens - 1):
        started = time.perf_counter()
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        output = decoder(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        token = head(output.last_hidden_state[:, -1:]).argmax(-1)
        synchronize(device)
        steps.append(time.perf_counter() - started)
        cache = output.past_key_values
    peak = _peak_memory(device)
    return RunTiming(prefill, ttft, steps, cache, kept, prefill_bytes, cache_nbytes(cache), peak, start, resettable)


def run_once(model: Any, input_ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None = None
             ) -> tuple[float, list[float], Any]:
    """Prefill then ``new_tokens - 1`` decode steps; returns (TTFT seconds, step seconds,
    (cache, kept tokens per layer after prefill, cache bytes after prefill))."""
    run = run_timed(model, input_ids, new_tokens, attention_mask)
    return run.ttft, run.steps, (run.cache, run.kept, run.prefill_bytes)


def summarize(method: str, input_ids: torch.Tensor, new_tokens: int, runs: Sequence[RunTiming], label: str = "",
              memory_run: RunTiming | None = None) -> SpeedResult:
    """Medians (times) and maxima (peaks) over ``runs`` of one configuration; ``memory_run`` (an untimed CPU run
    with ``track_tensors``) gives the tensor peak where the timed runs have none."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    steps = [s for run in runs for s in run.steps]
    prefill = statistics.median(run.prefill for run in runs)
    ttft = statistics.median(run.ttft for run in runs)
    decode = statistics.median(sum(run.steps) for run in runs)
    batch, length = input_ids.shape
    last = runs[-1]
    peak = max(run.peak for run in runs)
    counted = [run.tensor_peak for run in [*runs, *([memory_run] if memory_run else [])] if run.tensor_peak is not None]
    if counted:
        over_start = max(counted)
        how = CUDA_COUNT if input_ids.device.type == "cuda" else CPU_COUNT
    else:
        over_start, how = max(run.peak - run.start for run in runs), RSS_COUNT
    return SpeedResult(
        method=method, context_length=length, batch_size=batch, new_tokens=new_tokens, prefill_seconds=prefill,
        tpot_seconds=statistics.median(steps) if steps else 0.0, decode_seconds=decode,
        throughput_tokens_per_second=batch * new_tokens / (ttft + decode), prefill_cache_bytes=last.prefill_bytes,
        cache_bytes=last.final_bytes,
        kept_tokens=sum(last.kept) / len(last.kept) if last.kept else float(length), peak_memory_bytes=peak,
        step_seconds=steps, ttft_seconds=ttft, total_seconds=ttft + decode,
        peak_memory_over_start_bytes=over_start, peak_memory_resettable=all(run.resettable for run in runs),
        peak_memory_how=how, label=label or method,
    )


def measure(model: Any, input_ids: torch.Tensor, *, method: str, new_tokens: int = 16, repeats: int = 3,
            warmup: int = 1, attention_mask: torch.Tensor | None = None, track_memory: bool = True) -> SpeedResult:
    """Median latency of ``repeats`` runs (after ``warmup``) of the model as it is (patched or not); a padded batch
    passes its ``attention_mask``. ``track_memory`` (CPU): one more, untimed run counts the tensor peak. It runs
    first, before the warm-ups: timed runs right after a counting run measured slower (issue 15's A/B, where each
    side's timed runs followed the other side's counting run), so the warm-ups absorb it, not the timed runs of this
    call or of the next one."""
    memory_run = _memory_run(model, input_ids, new_tokens, attention_mask, track_memory)
    for _ in range(warmup):
        run_timed(model, input_ids, min(new_tokens, 2), attention_mask)
    runs = []
    for _ in range(repeats):
        runs.append(run_timed(model, input_ids, new_tokens, attention_mask))
        runs[-1].cache = None  # keep only numbers: a held cache would weigh on the next runs
    return summarize(method, input_ids, new_tokens, runs, memory_run=memory_run)


def _memory_run(model: Any, input_ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None,
                track_memory: bool) -> RunTiming | None:
    """The untimed run that counts a CPU run's tensor peak (None on CUDA, whose timed runs count it, or when off)."""
    if not track_memory or input_ids.device.type != "cpu":
        return None
    run = run_timed(model, input_ids, new_tokens, attention_mask, track_tensors=True)
    run.cache = None
    return run


# -- several configurations side by side ------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """A method and its parameters under a label (``fullkv``, ``streamingllm:max_capacity_prompt=256``)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.method + ("" if not self.params else ":" + ",".join(
                f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.params.items()))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text.lower() == "none" else text


def parse_method_spec(spec: str) -> MethodSpec:
    """``name[:key=value,key=value][@label]`` → :class:`MethodSpec` (values parsed as JSON where they can be:
    ``256``, ``0.5``, ``[0,1]``, ``null``; otherwise strings; the label defaults to the spec itself).
    ``unpatched`` names the model without kvfactory's patch."""
    spec, _, label = spec.strip().partition("@")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in re.split(r",(?![^\[]*\])", rest) if rest else []:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"bad method spec {spec!r}: parameters are key=value pairs after ':', e.g. "
                             "streamingllm:max_capacity_prompt=256,decode_budget=256")
        params[key.strip()] = _parse_value(value.strip())
    if name != UNPATCHED:
        from kvfactory import methods

        methods.get(name, **params)  # unknown methods / parameters fail here, before any model runs
    return MethodSpec(name, params, label.strip() or spec.strip())


def _patched(model: Any, spec: MethodSpec) -> Any:
    import contextlib

    import kvfactory

    return contextlib.nullcontext() if spec.method == UNPATCHED else kvfactory.patch(model, spec.method, **spec.params)


def compare(model: Any, input_ids: torch.Tensor, specs: Sequence[MethodSpec], *, new_tokens: int = 16,
            repeats: int = 3, warmup: int = 1, on_run: Callable[[], None] | None = None, track_memory: bool = True
            ) -> list[SpeedResult]:
    """Measure every configuration on the same prompt, round-robin: all warm-ups, then repeat 1 of each, repeat 2 of
    each, ... (machine drift hits every configuration alike). ``on_run`` is called after each run (progress).
    ``track_memory`` (CPU): then one untimed run per configuration counts its tensor peak."""
    runs: dict[str, list[RunTiming]] = {spec.label: [] for spec in specs}
    if len(runs) != len(specs):
        raise ValueError("configuration labels must be distinct")
    for spec in specs:
        for _ in range(warmup):
            with _patched(model, spec):
                run_timed(model, input_ids, min(new_tokens, 2))
    for _ in range(repeats):
        for spec in specs:
            with _patched(model, spec):
                runs[spec.label].append(run_timed(model, input_ids, new_tokens))
            runs[spec.label][-1].cache = None  # keep only numbers: a held cache would weigh on the next runs
            if on_run is not None:
                on_run()
    results = []
    for spec in specs:
        with _patched(model, spec):
            memory_run = _memory_run(model, input_ids, new_tokens, None, track_memory)
        results.append(summarize(spec.method, input_ids, new_tokens, runs[spec.label], spec.label, memory_run))
    return results


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def ratios(result: SpeedResult, baseline: SpeedResult) -> dict[str, float]:
    """Speedups (baseline time ÷ this time: > 1 is faster) and ratios (this ÷ baseline: < 1 is smaller)."""
    return {
        "prefill_speedup": _ratio(baseline.prefill_seconds, result.prefill_seconds),
        "ttft_speedup": _ratio(baseline.ttft_seconds, result.ttft_seconds),
        "tpot_speedup": _ratio(baseline.tpot_seconds, result.tpot_seconds),
        "throughput_ratio": _ratio(result.throughput_tokens_per_second, baseline.throughput_tokens_per_second),
        "cache_bytes_ratio": _ratio(result.cache_bytes, baseline.cache_bytes),
        "peak_memory_ratio": _ratio(result.peak_memory_bytes, baseline.peak_memory_bytes),
        "peak_memory_over_start_ratio": _ratio(result.peak_memory_over_start_bytes,
                                               baseline.peak_memory_over_start_bytes),
    }


def rows_with_ratios(results: Sequence[SpeedResult], baseline_label: str = "fullkv") -> list[dict[str, Any]]:
    """``as_row()`` of every result plus :func:`ratios` against the result labelled ``baseline_label``."""
    baseline = next((r for r in results if r.label == baseline_label), None)
    if baseline is None:
        raise ValueError(f"no result labelled {baseline_label!r} among {[r.label for r in results]}")
    return [{**r.as_row(), **ratios(r, baseline)} for r in results]


def sweep(model: Any, prompt: Callable[[int], torch.Tensor], lengths: Sequence[int], specs: Sequence[MethodSpec], *,
          new_tokens: int = 32, repeats: int = 3, warmup: int = 1, baseline_label: str = "fullkv",
          warmup_every_length: bool = False, progress: bool = True,
          on_length: Callable[[list[dict[str, Any]]], None] | None = None, track_memory: bool = True
          ) -> list[dict[str, Any]]:
    """:func:`compare` at every context length (``prompt(n)`` gives a ``(1, n)`` prompt); rows carry the ratios to
    ``baseline_label`` measured at the same length in the same run. The ``warmup`` runs (code paths, allocator) are
    made at the first length only unless ``warmup_every_length``: at long contexts a warm-up costs a full prefill.
    ``on_length(rows so far)`` is called after every length (e.g. to save partial results)."""
    from tqdm import tqdm

    bar = tqdm(total=len(lengths) * len(specs) * repeats, desc="speed sweep", unit="run", disable=not progress)
    rows: list[dict[str, Any]] = []
    for index, length in enumerate(lengths):
        bar.set_postfix(context=length)
        results = compare(model, prompt(length), specs, new_tokens=new_tokens, repeats=repeats,
                          warmup=warmup if index == 0 or warmup_every_length else 0, on_run=lambda: bar.update(1),
                          track_memory=track_memory)
        rows.extend(rows_with_ratios(results, baseline_label))
        if on_length is not None:
            on_length(rows)
    bar.close()
    return rows


def write_rows(rows: Sequence[dict[str, Any]], stem: Path) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.json`` (the same rows; nested values JSON-encoded in the CSV)."""
    import csv

    stem.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    json_path.write_text(json.dumps(list(rows), indent=1, default=str))
    return csv_path, json_path
