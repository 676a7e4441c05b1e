"""Latency and memory against the context length, FullKV and every method side by side in one run (CLI).

For each context length: every configuration is warmed up, then measured ``--repeats`` times round-robin
(:func:`kvfactory.benchmarks.speed.compare`); rows carry prefill / TTFT / TPOT / throughput / total time, cache bytes,
peak memory and their ratios to FullKV at the same length. Writes
``{output_dir}/speed/{model}_{prompt}_speed_vs_context.csv|json|png``.

Examples::

    python run_speed.py --methods "streamingllm:max_capacity_prompt=256,decode_budget=256@streamingllm C=256" \\
        --context_lengths 512,1024,2048,4096,8192
    python run_speed.py --config llama-3-8b --dtype bfloat16 --context_lengths 4096,16384,32768   # GPU, random weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

DEFAULT_METHODS = ("streamingllm:max_capacity_prompt=256,decode_budget=256@streamingllm C=256",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from kvfactory.benchmarks.common import add_model_arguments

    parser = argparse.ArgumentParser(prog="run_speed.py", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--config", default=None,
                        help="a named config of kvfactory.models (e.g. llama-3-8b): random weights, no tokenizer "
                             "(replaces --model_path; random prompts)")
    parser.add_argument("--device", default=None, help="device for --config (default: cuda when available, else cpu)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="method specs name[:key=value,...][@label]; fullkv is added first when missing; "
                             "'unpatched' is the model without kvfactory")
    parser.add_argument("--context_lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--new_tokens", type=int, default=32, help="generated tokens per run (TPOT over new_tokens-1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs per configuration (first length only)")
    parser.add_argument("--warmup_every_length", action="store_true", help="warm up again at every context length")
    parser.add_argument("--prompt", default="auto", choices=["auto", "text", "random"],
                        help="auto: text of --dataset when a tokenizer and the data exist, else random token ids")
    parser.add_argument("--dataset", default="pg_essays")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output_dir", type=Path, default=Path("results_ppl"))
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, label) for ``--config`` or ``--model_path``."""
    from kvfactory import models
    from kvfactory.benchmarks.common import load_model, model_label, resolve_dtype

    if args.config:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = models.random_model(args.config, seed=args.seed, dtype=resolve_dtype(args.dtype, None), device=device)
        if model.config._attn_implementation != args.attn_implementation:
            model.config._attn_implementation = args.attn_implementation
        return model, None, f"random-{args.config}"
    loaded = load_model(args)
    model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
    return model, tokenizer, model_label(args.model_path)


def prompt_source(args: argparse.Namespace, model: Any, tokenizer: Any, longest: int) -> tuple[Any, str]:
    """A function length -> (1, length) prompt on the model's device, and its name (the dataset or 'random')."""
    from kvfactory.benchmarks import ppl

    device = next(model.parameters()).device
    use_text = args.prompt == "text" or (args.prompt == "auto" and tokenizer is not None and (
        args.data_dir is not None or ppl.default_data_dir() is not None or args.dataset != ppl.DEFAULT_DATASET))
    if use_text:
        if tokenizer is None:
            raise ValueError("--prompt text needs a model with a tokenizer (not --config)")
        stream = ppl.token_stream(tokenizer, ppl.load_documents(args.dataset, args.data_dir))
        if len(stream) < longest:
            raise ValueError(f"{args.dataset} gives {len(stream)} tokens; the longest context asked is {longest}")
        return (lambda n: torch.tensor([stream[:n]], device=device)), args.dataset
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, longest), generator=generator)
    return (lambda n: ids[:, :n].to(device)), "random"


def _error(message: str) -> int:
    """One line on stderr, exit status 2 (argparse's convention for bad arguments)."""
    print(f"run_speed.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from kvfactory.benchmarks.common import parse_list, write_run_meta
    from kvfactory.benchmarks.efficiency_plots import plot_latency_vs_context
    from kvfactory.benchmarks.speed import MethodSpec, parse_method_spec, sweep, write_rows

    args = parse_args(argv)
    from kvfactory.benchmarks.common import configure_logging

    configure_logging()
    specs = [parse_method_spec(spec) for spec in args.methods]
    if not any(spec.label == "fullkv" for spec in specs):
        specs.insert(0, MethodSpec("fullkv", {}, "fullkv"))
    try:
        lengths = parse_list(args.context_lengths, int)
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        return _error(f"--context_lengths needs comma-separated integers of at least 2 (e.g. 512,1024), got "
                      f"{args.context_lengths!r}")
    try:
        model, tokenizer, label = load(args)
        prompt, source = prompt_source(args, model, tokenizer, max(lengths))
    except (ValueError, FileNotFoundError) as error:
        return _error(str(error))
    device = next(model.parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    folder = args.output_dir / "speed"
    write_run_meta(folder, args, {"specs": [(s.label, s.method, s.params) for s in specs]})
    stem = folder / f"{label}_{source}_speed_vs_context"

    def save(rows: list[dict[str, Any]]) -> None:  # after every length: an interrupted sweep keeps what it measured
        for row in rows:
            row.update(model=label, prompt=source, device=device_name)
        write_rows(rows, stem)

    rows = sweep(model, prompt, lengths, specs, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                 warmup_every_length=args.warmup_every_length, on_length=save)
    csv_path = stem.with_suffix(".csv")
    plot = plot_latency_vs_context(rows, stem.with_suffix(".png"), f"{label} ({device_name}), {args.new_tokens} new tokens")
    print(f"{label} on {device_name}; medians of {args.repeats} round-robin repeats; ratios vs fullkv at each length")
    print(f"{'context':>8} {'config':<22}{'prefill s':>10}{'TTFT s':>9}{'TPOT ms':>9}{'tok/s':>8}{'cache MiB':>10}"
          f"{'peak+ MiB':>10}{'tpot x':>8}{'ttft x':>8}{'thr x':>7}{'cache x':>8}")
    for r in rows:
        print(f"{r['context_length']:>8} {r['label'][:21]:<22}{r['prefill_seconds']:>10.3f}{r['ttft_seconds']:>9.3f}"
              f"{r['tpot_seconds'] * 1e3:>9.1f}{r['throughput_tokens_per_second']:>8.2f}"
              f"{r['cache_bytes'] / 2**20:>10.1f}{r['peak_memory_over_start_bytes'] / 2**20:>10.1f}"
              f"{r['tpot_speedup']:>8.2f}{r['ttft_speedup']:>8.2f}{r['throughput_ratio']:>7.2f}"
              f"{r['cache_bytes_ratio']:>8.3f}")
    print(f"-> {csv_path}, {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
