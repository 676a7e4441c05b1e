"""The GPU check in one command: random-weight models of real shapes, fullkv parity, each method against FullKV.

``bash benchmarks/gpu_check.sh`` on a CUDA machine (bf16, Llama-3-8B and Qwen2-7B shapes from ``kvfactory.models``,
``--models llama-3-8b,qwen2-7b,mistral-7b-v0.2`` for more; contexts 8k, 16k, 32k, C=2048: planned for under 10
minutes on one H100/H200, not yet timed on one), or
``bash benchmarks/gpu_check.sh --tiny`` anywhere (tiny configs on CPU, under a minute: CI runs it).

Checks and measurements, each a row of ``{output_dir}/gpu_check.csv`` and of the printed table:

1. ``parity``: patched ``fullkv`` logits against the unpatched model, for eager, sdpa and flash_attention_2 (when
   flash-attn is installed and CUDA is there). Passes when the largest difference is at most ``PARITY_TOLERANCE``
   of the largest logit (``exact`` says whether it is bit for bit).
2. ``speed`` (per model and context, round-robin repeats of :func:`kvfactory.benchmarks.speed.compare`): prefill and
   TPOT of snapkv / pyramidkv / h2o / adakv at C, each ÷ fullkv; then, from one more run per method under
   :func:`kvfactory.benchmarks.memory.peak_memory` (CUDA ``max_memory_allocated``, or counted tensor storages on
   CPU): peak memory saved ÷ KV bytes saved, both against fullkv (1 = every byte the cache does not hold is a byte
   of peak saved; the prefill's full-prompt keys of the layer being compressed make it a little less).
3. ``batch``: throughput of a batch of ``--batch`` prompts ÷ one prompt, at the shortest context, per method.
4. ``split``: one method per family (snapkv dense, adakv ragged, snapkv + kivi quantized) on a model (4 layers of the
   real shape) whose first layers sit on the accelerator and the rest on the CPU (``device_map``; on a CPU-only
   machine every part is on the CPU, through the same accelerate hooks), against the same weights on one device,
   at ``2 C`` tokens: same kept tokens, and the greedy tokens' agreement (1 required on CPU; GPU and CPU kernels
   round differently, so there it is reported).

5. ``fused decode``: the decode-attention kernels of issue 20 (Triton on CUDA, ``KVFACTORY_TRITON_DECODE``; the C++
   extension on CPU, ``KVFACTORY_NO_CPP_KERNELS``) against the fallback they replace (sdpa over the store's rows, or
   over the dequantized cache), for the ragged family (adakv) and the quantized one (snapkv + kivi-4), at the
   shortest context: two caches from the same prefill, each decode step run on both, alternating which goes first
   (the fallback's greedy token feeds both). Passes when the largest logit difference is within
   ``PARITY_TOLERANCE``; the value is TPOT fused ÷ fallback (median of the steps).

Timings are one run on whatever else the machine is doing: read the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import kvfactory
from kvfactory import kernels, models
from kvfactory.attention import flash_attn_available
from kvfactory.benchmarks import speed
from kvfactory.benchmarks.memory import peak_memory
from kvfactory.kernels import triton_decode
from kvfactory.storage import fused_decode

logger = logging.getLogger("gpu_check")

FULL_MODELS = ("llama-3-8b", "qwen2-7b")  # add mistral-7b-v0.2 etc. with --models
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
METHODS = ("snapkv", "pyramidkv", "h2o", "adakv")
PARITY_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # of the largest |logit|
SPLIT_FAMILIES = (("dense", "snapkv", {}), ("ragged", "adakv", {}),
                  ("quantized", "snapkv", {"quant_method": "kivi", "nbits": 4, "q_group_size": 32,
                                           "quant_residual_length": 32}))
FUSED_FAMILIES = SPLIT_FAMILIES[1:]  # the stores whose decode attention has a kernel: ragged and quantized
CHECKS = ("parity", "speed", "batch", "split", "fused")
COLUMNS = ("check", "model", "device", "dtype", "context", "config", "value", "passed", "detail")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (CI): seconds, not minutes")
    parser.add_argument("--models", default=None, help=f"comma-separated configs (default {','.join(FULL_MODELS)}; "
                                                       f"--tiny: {','.join(TINY_MODELS)})")
    parser.add_argument("--context_lengths", default=None, help="default 8192,16384,32768 (--tiny: 48,96)")
    parser.add_argument("--budget", type=int, default=None, help="C, tokens kept per layer (default 2048; --tiny 16)")
    parser.add_argument("--window_size", type=int, default=None, help="observation window (default 32; --tiny 3)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the throughput check")
    parser.add_argument("--new_tokens", type=int, default=None, help="tokens per timed run (default 32; --tiny 3)")
    parser.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default 2; --tiny 1)")
    parser.add_argument("--parity_tokens", type=int, default=None, help="prompt of the parity check (default 1024)")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument("--split_layers", type=int, default=None,
                        help="layers of the split-device model (default 4; --tiny: the config's)")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to skip: {','.join(CHECKS)}")
    parser.add_argument("--output_dir", type=Path, default=Path("results_gpu_check"))
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    defaults = dict(models=",".join(TINY_MODELS if tiny else FULL_MODELS),
                    context_lengths="48,96" if tiny else "8192,16384,32768", budget=16 if tiny else 2048,
                    window_size=4 if tiny else 32, new_tokens=3 if tiny else 32, repeats=1 if tiny else 2,
                    parity_tokens=48 if tiny else 1024,
                    dtype="bfloat16" if args.device.type == "cuda" else "float32")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.models = [m for m in args.models.split(",") if m]
    args.context_lengths = [int(n) for n in args.context_lengths.split(",") if n]
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(CHECKS)
    if unknown:
        parser.error(f"--skip takes {', '.join(CHECKS)}; got {', '.join(sorted(unknown))}")
    if args.budget >= min(args.context_lengths):
        parser.error(f"--budget {args.budget} must be below the shortest context {min(args.context_lengths)}")
    return args


def _row(check: str, model: str, args: argparse.Namespace, *, context: int | str = "", config: str = "",
         value: float | str = "", passed: bool | str = "", detail: str = "") -> dict[str, Any]:
    return dict(check=check, model=model, device=str(args.device), dtype=args.dtype, context=context, config=config,
                value=value, passed=passed, detail=detail)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prompt(vocab: int, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def _method_params(method: str, args: argparse.Namespace) -> dict[str, Any]:
    return {} if method == "fullkv" else {"max_capacity_prompt": args.budget, "window_size": args.window_size}


# -- 1. parity ----------------------------------------------------------------------------------------------------
def implementations(device: torch.device) -> list[str]:
    """eager and sdpa everywhere; flash_attention_2 when flash-attn is installed and the device is CUDA."""
    found = ["eager", "sdpa"]
    if device.type == "cuda" and flash_attn_available():
        found.append("flash_attention_2")
    return found


def check_parity(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    dtype = models.resolve_dtype(args.dtype)
    for implementation in implementations(args.device):
        model = models.random_model(name, dtype=args.dtype, attn_implementation=implementation, device=args.device)
        ids = _prompt(model.config.vocab_size, args.parity_tokens).to(args.device)
        with torch.no_grad():
            reference = model(ids).logits.float()
            with kvfactory.patch(model, "fullkv"):
                patched = model(ids).logits.float()
        difference = (patched - reference).abs().max().item()
        relative = difference / reference.abs().max().item()
        rows.append(_row("parity", name, args, context=args.parity_tokens, config=implementation, value=relative,
                         passed=relative <= PARITY_TOLERANCE[dtype],
                         detail=f"max |diff| {difference:.3g}; {'exact' if difference == 0 else 'not bit-exact'}"))
        del model, reference, patched
        _free(args.device)
    if args.device.type == "cuda" and not flash_attn_available():
        rows.append(_row("parity", name, args, config="flash_attention_2", passed="skipped",
                         detail="flash-attn is not installed"))
    return rows


# -- 2. speed and memory ------------------------------------------------------------------------------------------
def _specs(args: argparse.Namespace) -> list[speed.MethodSpec]:
    return [speed.MethodSpec(method, _method_params(method, args), method) for method in ("fullkv", *METHODS)]


def _memory(model: Any, ids: torch.Tensor, spec: speed.MethodSpec) -> tuple[int, int]:
    """(peak bytes over the start, final cache bytes) of one prefill + 2 decode steps under ``spec``."""
    _free(ids.device)
    with kvfactory.patch(model, spec.method, **spec.params), peak_memory(ids.device) as peak:
        run = speed.run_timed(model, ids, 3)
        cache_bytes = run.final_bytes
        del run
    return peak.bytes, cache_bytes


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 \
        else f"{nbytes / 2**10:.1f} KiB"


def check_speed(name: str, model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    specs = _specs(args)
    for index, length in enumerate(args.context_lengths):
        ids = _prompt(model.config.vocab_size, length).to(args.device)
        results = speed.compare(model, ids, specs, new_tokens=args.new_tokens, repeats=args.repeats,
                                warmup=1 if index == 0 else 0)
        by_label = {r["label"]: r for r in speed.rows_with_ratios(results)}
        memory = {spec.label: _memory(model, ids, spec) for spec in specs}
        full_peak, full_bytes = memory["fullkv"]
        for method in METHODS:
            row = by_label[method]
            peak, cache_bytes = memory[method]
            peak_ratio = (full_peak - peak) / (full_bytes - cache_bytes) if full_bytes != cache_bytes else float("nan")
            common = dict(context=length, config=f"{method} C={args.budget}")
            rows.append(_row("prefill/fullkv", name, args, value=row["prefill_seconds"] / by_label["fullkv"][
                "prefill_seconds"], **common))
            rows.append(_row("tpot/fullkv", name, args, value=row["tpot_seconds"] / by_label["fullkv"]["tpot_seconds"],
                             **common))
            # tiny models: the KV cache is a sliver of the transient buffers, so the ratio is shown, not judged
            rows.append(_row("peak saved/kv saved", name, args, value=peak_ratio,
                             passed="" if args.tiny else peak < full_peak,
                             detail=f"peak {_size(peak)} vs {_size(full_peak)}; KV {_size(cache_bytes)} vs "
                                    f"{_size(full_bytes)}", **common))
        rows.append(_row("tpot", name, args, context=length, config="fullkv",
                         value=by_label["fullkv"]["tpot_seconds"], detail="seconds (absolute, for scale)"))
        del ids
        _free(args.device)
    return rows


# -- 3. batch throughput ------------------------------------------------------------------------------------------
def check_batch(name: str, model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    length = min(args.context_lengths)
    single = _prompt(model.config.vocab_size, length).to(args.device)
    batch = _prompt(model.config.vocab_size, length, args.batch, seed=1).to(args.device)
    rows = []
    specs = _specs(args)
    one = {r.label: r for r in speed.compare(model, single, specs, new_tokens=args.new_tokens, repeats=args.repeats,
                                             warmup=0)}
    many = {r.label: r for r in speed.compare(model, batch, specs, new_tokens=args.new_tokens, repeats=args.repeats,
                                              warmup=1)}
    for spec in specs:
        ratio = many[spec.label].throughput_tokens_per_second / one[spec.label].throughput_tokens_per_second
        rows.append(_row(f"batch{args.batch}/batch1 throughput", name, args, context=length, config=spec.label,
                         value=ratio))
    del batch
    _free(args.device)
    return rows


# -- 4. split device map ------------------------------------------------------------------------------------------
def _split_map(num_layers: int, accelerator: torch.device, model_rotary: bool = False) -> dict[str, Any]:
    """Embeddings and the first half of the layers on the accelerator, the rest and the head on the CPU
    (``model_rotary``: the decoder stack has its own rotary module, as Llama's in 4.44.2)."""
    first = (accelerator.index or 0) if accelerator.type == "cuda" else "cpu"
    device_map: dict[str, Any] = {"model.embed_tokens": first}
    if model_rotary:
        device_map["model.rotary_emb"] = first
    for layer in range(num_layers):
        device_map[f"model.layers.{layer}"] = first if layer < num_layers // 2 else "cpu"
    device_map.update({"model.norm": "cpu", "lm_head": "cpu"})
    return device_map


def check_split(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One model built once: every family on one device, then the same weights dispatched over the accelerator and
    the CPU (:func:`_split_map`), every family again."""
    from accelerate import dispatch_model

    overrides = {} if args.tiny and args.split_layers is None else {"num_hidden_layers": args.split_layers or 4}
    length = min(args.context_lengths) if args.tiny else min(min(args.context_lengths), 2 * args.budget)
    model = models.random_model(name, dtype=args.dtype, device=args.device, **overrides)
    ids = _prompt(model.config.vocab_size, length)
    runs: dict[str, list[tuple[torch.Tensor, list[int]] | Exception]] = {}
    device_map = _split_map(model.config.num_hidden_layers, args.device, hasattr(model.model, "rotary_emb"))
    for placement in ("whole", "split"):
        if placement == "split":
            model = dispatch_model(model, device_map=device_map)
        for family, method, extra in SPLIT_FAMILIES:
            try:
                with kvfactory.patch(model, method, **_method_params(method, args), **extra) as handle, \
                        torch.no_grad():
                    tokens = model.generate(ids.to(args.device), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                            pad_token_id=0)[:, length:].cpu()
                    runs.setdefault(family, []).append((tokens, handle.last_cache.kept_tokens()))
            except Exception as error:  # noqa: BLE001 - a failed check is a row, the other checks still run
                logger.exception("%s %s on the %s model failed", method, family, placement)
                runs.setdefault(family, []).append(error)
    del model
    _free(args.device)
    rows = []
    places = "+".join(sorted({str(v) for v in device_map.values()}))
    for family, method, extra in SPLIT_FAMILIES:
        label = f"{family} {method}{' ' + extra['quant_method'] if extra else ''} on {places}"
        failures = [run for run in runs[family] if isinstance(run, Exception)]
        if failures:
            rows.append(_row("split device map", name, args, context=length, config=label, value=float("nan"),
                             passed=False, detail=f"{type(failures[0]).__name__}: {failures[0]}"))
            continue
        (expected, expected_kept), (tokens, kept) = runs[family]
        agreement = (tokens == expected).float().mean().item()
        exact_expected = args.device.type == "cpu"  # same kernels: identical; CPU vs GPU kernels: close
        rows.append(_row("split device map", name, args, context=length, config=label, value=agreement,
                         passed=kept == expected_kept and (agreement == 1.0 or not exact_expected),
                         detail=f"greedy token agreement with one device; kept {kept} vs {expected_kept}"))
    return rows


# -- 5. fused decode kernels ----------------------------------------------------------------------------------------
def fused_switch(device: torch.device) -> tuple[str, str, str, bool]:
    """(environment variable, its value with the fused decode kernels, its value without, whether they can run)
    on ``device``: Triton on CUDA, the C++ extension on CPU."""
    if device.type == "cuda":
        return fused_decode.TRITON_VARIABLE, "1", "0", triton_decode.triton_available()
    with _environment(kernels.DISABLE_VARIABLE, "0"):
        return kernels.DISABLE_VARIABLE, "0", "1", kernels.decode_kernels_available()


@contextlib.contextmanager
def _environment(variable: str, value: str) -> Iterator[None]:
    saved = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[variable]
        else:
            os.environ[variable] = saved


@contextlib.contextmanager
def _counting_calls(module: Any, names: tuple[str, ...]) -> Iterator[list[int]]:
    """Counts the calls of ``module``'s functions ``names`` (the fused kernels' entry points) while open: a store the
    kernels do not cover (a sliding window, say) falls back on both sides, and must not read as a pass."""
    count = [0]
    originals = {name: getattr(module, name) for name in names}

    def counted(function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return function(*args, **kwargs)
        return call

    for name, function in originals.items():
        setattr(module, name, counted(function))
    try:
        yield count
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def _timed_step(model: Any, token: torch.Tensor, cache: Any, device: torch.device) -> tuple[torch.Tensor, float]:
    speed.synchronize(device)
    started = time.perf_counter()
    logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1].float()
    speed.synchronize(device)
    return logits, time.perf_counter() - started


@torch.no_grad()
def check_fused_decode(name: str, model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    variable, fused, fallback, available = fused_switch(args.device)
    length = min(args.context_lengths)
    ids = _prompt(model.config.vocab_size, length).to(args.device)
    tolerance = PARITY_TOLERANCE[models.resolve_dtype(args.dtype)]
    rows = []
    for family, method, extra in FUSED_FAMILIES:
        label = f"{family} {method}{' ' + extra['quant_method'] if extra else ''} C={args.budget}"
        if not available:
            rows.append(_row("fused decode", name, args, context=length, config=label,
                             detail=f"not run: the {'Triton' if args.device.type == 'cuda' else 'C++'} decode "
                                    f"kernels cannot run here"))
            continue
        backend = triton_decode if args.device.type == "cuda" else kernels
        with kvfactory.patch(model, method, **_method_params(method, args), **extra) as handle, \
                _counting_calls(backend, ("ragged_decode_attention", "quantized_decode_attention")) as kernel_calls:
            caches, seconds = {}, {fused: [], fallback: []}
            for setting in (fused, fallback):
                caches[setting] = handle.new_cache()
                logits = model(ids, past_key_values=caches[setting], use_cache=True).logits[:, -1].float()
            token, worst = logits.argmax(-1, keepdim=True), 0.0
            for step in range(max(args.new_tokens, 2) * 2):
                step_logits = {}
                for setting in (fused, fallback) if step % 2 == 0 else (fallback, fused):
                    with _environment(variable, setting):
                        step_logits[setting], took = _timed_step(model, token, caches[setting], args.device)
                    seconds[setting].append(took)
                reference = step_logits[fallback]
                difference = (step_logits[fused] - reference).abs().max().item() / reference.abs().max().item()
                worst = max(worst, difference)
                token = reference.argmax(-1, keepdim=True)
            del caches
        ratio = statistics.median(seconds[fused]) / statistics.median(seconds[fallback])
        if not kernel_calls[0]:
            rows.append(_row("fused decode", name, args, context=length, config=label, value=ratio,
                             detail="not covered: the kernels were never called (this store falls back on both "
                                    "sides, e.g. under a sliding window)"))
            continue
        rows.append(_row("fused decode", name, args, context=length, config=label, value=ratio,
                         passed=worst <= tolerance,
                         detail=f"TPOT fused / fallback ({variable}={fused} vs {fallback}); largest logit "
                                f"difference {worst:.2e} of the largest logit over {len(seconds[fused])} steps, "
                                f"{kernel_calls[0]} kernel calls"))
    _free(args.device)
    return rows


# -- driver -------------------------------------------------------------------------------------------------------
def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = ("check", "model", "context", "config", "value", "passed", "detail")
    cells = [[_format(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) if cells else len(c) for i, c in enumerate(columns)]
    widths[-1] = min(widths[-1], 70)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell[:w].ljust(w) for cell, w in zip(line, widths)))


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "kvfactory.patching", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    for name in args.models if args.tiny else ():
        models.random_model(name)  # imports every module the run will use (transformers imports models lazily)
    import accelerate  # noqa: F401
    gc.collect()
    gc.freeze()  # the imports' objects are permanent: the collections before every timed run then take milliseconds
    try:
        return _run(args, started)
    finally:
        gc.unfreeze()


def _run(args: argparse.Namespace, started: float) -> int:
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    logger.info("gpu_check on %s, %s, models %s, contexts %s, C=%d", device_name, args.dtype, args.models,
                args.context_lengths, args.budget)
    rows: list[dict[str, Any]] = []
    csv_path = args.output_dir / "gpu_check.csv"
    for name in args.models:
        if "parity" not in args.skip:
            rows += check_parity(name, args)
            logger.info("%s parity done at %.0f s", name, time.perf_counter() - started)
        if not {"speed", "batch", "fused"} <= args.skip:
            model = models.random_model(name, dtype=args.dtype, device=args.device)
            if "fused" not in args.skip:
                rows += check_fused_decode(name, model, args)
                logger.info("%s fused decode done at %.0f s", name, time.perf_counter() - started)
            if "speed" not in args.skip:
                rows += check_speed(name, model, args)
                logger.info("%s speed done at %.0f s", name, time.perf_counter() - started)
            if "batch" not in args.skip:
                rows += check_batch(name, model, args)
                logger.info("%s batch done at %.0f s", name, time.perf_counter() - started)
            del model
            _free(args.device)
        if "split" not in args.skip:
            rows += check_split(name, args)
            logger.info("%s split done at %.0f s", name, time.perf_counter() - started)
        write_csv(rows, csv_path)  # after every model: an interrupted run keeps what it measured
    print(f"\ngpu_check on {device_name} ({args.dtype}), {time.perf_counter() - started:.0f} s; one run: timings "
          f"are noisy, read the ratios")
    print_table(rows)
    print(f"-> {csv_path}")
    failed = [row for row in rows if row["passed"] is False]
    for row in failed:
        print(f"FAILED: {row['check']} {row['model']} {row['config']}: {row['detail']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
