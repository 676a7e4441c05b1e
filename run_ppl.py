"""Perplexity benchmarks under KV-cache compression (CLI). Subcommands:

- ``suffix``: suffix PPL of one method (KVCache-Factory flags) next to FullKV on the same windows;
- ``streaming``: streaming PPL over a long stream, token by token with bounded caches, plus the chunked baseline;
- ``grid``: methods × budgets × datasets, PPL and speed/memory with ratios to FullKV (:mod:`kvfactory.benchmarks.grid`);
- ``plot``: redraw every PNG from the JSON results (:mod:`kvfactory.benchmarks.efficiency_plots`).

``python run_ppl.py <subcommand> --help`` for the flags; results go under ``--output_dir`` (default ``results_ppl``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

STREAMING_DEFAULTS = (
    "fullkv",
    "streamingllm:max_capacity_prompt=256,sink_size=4,decode_budget=256@streamingllm(4+252)",
    "h2o:sink_size=4,window_size=128,max_capacity_prompt=260,decode_budget=260@h2o(4+128+128)",
)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    from kvfactory.benchmarks import ppl

    parser.add_argument("--dataset", default=ppl.DEFAULT_DATASET,
                        help=f"{ppl.DEFAULT_DATASET} (the .txt files of --data_dir) or {', '.join(ppl.HF_DATASETS)}")
    parser.add_argument("--data_dir", default=None, help="folder of .txt files (default: the shared PG essays)")
    parser.add_argument("--output_dir", type=Path, default=Path("results_ppl"))


def suffix(argv: list[str]) -> int:
    from kvfactory.benchmarks import grid, ppl
    from kvfactory.benchmarks.common import (add_method_arguments, add_model_arguments, load_model, model_label,
                                             patch_parameters, write_run_meta)
    from kvfactory.benchmarks.speed import write_rows

    parser = argparse.ArgumentParser(prog="run_ppl.py suffix", description="suffix PPL of a method vs FullKV")
    add_model_arguments(parser)
    add_method_arguments(parser)
    _data_arguments(parser)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--prefix_ratio", type=float, default=0.5)
    parser.add_argument("--max_windows", type=int, default=32)
    parser.add_argument("--suffix_chunk", type=int, default=None, help="suffix tokens per forward (default: all)")
    args = parser.parse_args(argv)
    name, params = patch_parameters(args)
    model, tokenizer = load_model(args)
    windows = ppl.split_windows(ppl.token_stream(tokenizer, ppl.load_documents(args.dataset, args.data_dir)),
                                args.max_length, args.max_windows)
    results = [ppl.suffix_ppl(model, windows, prefix_ratio=args.prefix_ratio, suffix_chunk=args.suffix_chunk)]
    if name != "fullkv":
        results.append(ppl.suffix_ppl(model, windows, method=name, params=params, prefix_ratio=args.prefix_ratio,
                                      suffix_chunk=args.suffix_chunk))
    rows = grid.ppl_rows(results, [None] * len(results), unit="", prefix_tokens=round(args.max_length * args.prefix_ratio))
    label = model_label(args.model_path)
    folder = args.output_dir / "suffix"
    write_run_meta(folder, args)
    csv_path, _ = write_rows(rows, folder / f"{label}_{args.dataset}_{name}_suffix_ppl")
    print(grid.format_table(rows))
    print(f"-> {csv_path}")
    return 0


def streaming(argv: list[str]) -> int:
    from kvfactory.benchmarks import ppl
    from kvfactory.benchmarks.common import add_model_arguments, load_model, model_label, write_run_meta
    from kvfactory.benchmarks.efficiency_plots import plot_streaming
    from kvfactory.benchmarks.speed import parse_method_spec, write_rows

    parser = argparse.ArgumentParser(prog="run_ppl.py streaming", description="streaming PPL with bounded caches")
    add_model_arguments(parser)
    _data_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(STREAMING_DEFAULTS),
                        help="method specs name[:key=value,...][@label]; default: fullkv, StreamingLLM 4+252 and "
                             "H2O 4+128+128 with decode_budget (bounded caches)")
    parser.add_argument("--num_eval_tokens", type=int, default=4096, help="tokens of the stream (from its start)")
    parser.add_argument("--chunk_size", type=int, default=1, help="tokens fed per step (1: token by token)")
    parser.add_argument("--fullkv_chunk_size", type=int, default=None,
                        help="tokens fed per step to fullkv (default: --chunk_size; its PPL does not depend on it)")
    parser.add_argument("--baseline_window", type=int, default=256,
                        help="window of the chunked FullKV baseline (0: skip it)")
    args = parser.parse_args(argv)
    specs = [parse_method_spec(spec) for spec in args.methods]
    model, tokenizer = load_model(args)
    stream = ppl.token_stream(tokenizer, ppl.load_documents(args.dataset, args.data_dir))[: args.num_eval_tokens]
    if len(stream) < args.num_eval_tokens:
        logging.warning("the stream has only %d tokens (asked for %d)", len(stream), args.num_eval_tokens)
    label = model_label(args.model_path)
    folder = args.output_dir / "streaming"
    write_run_meta(folder, args)
    stem = folder / f"{label}_{args.dataset}_streaming_ppl"

    def save(records: list[dict]) -> None:  # after every configuration: an interrupted run keeps what it measured
        write_rows([{k: v for k, v in r.items() if k not in ("step_seconds", "window_nll")} for r in records], stem)
        stem.with_suffix(".json").write_text(json.dumps(records, default=str))  # with the per-step traces, for plots

    records = ppl.streaming_comparison(model, stream, specs, chunk_size=args.chunk_size,
                                       fullkv_chunk_size=args.fullkv_chunk_size, baseline_window=args.baseline_window,
                                       save=save)
    plot = plot_streaming(records, stem.with_suffix(".png"), f"{label} on {args.dataset}: {len(stream)} tokens")
    print(f"{len(stream)} tokens of {args.dataset}, fed {args.chunk_size} at a time"
          + (f" (fullkv {args.fullkv_chunk_size})" if args.fullkv_chunk_size else ""))
    print(f"{'config':<26}{'PPL':>9}{'dPPL%':>8}{'acc':>7}{'kept':>8}{'ms/chunk':>9}{'last-1/4':>9}")
    for r in records:
        delta = f"{r['ppl_delta_pct_vs_fullkv']:+.2f}" if r["ppl_delta_pct_vs_fullkv"] is not None else ""
        step = r["step_median_seconds"]
        last = r["step_median_last_quarter_seconds"]
        print(f"{r['label']:<26}{r['ppl']:>9.3f}{delta:>8}{r['next_token_acc']:>7.3f}{r['kept_tokens']:>8.1f}"
              f"{'' if step is None else f'{step * 1e3:.1f}':>9}{'' if last is None else f'{last * 1e3:.1f}':>9}")
    print(f"-> {stem.with_suffix('.csv')}, {plot}")
    return 0


def grid_command(argv: list[str]) -> int:
    from kvfactory.benchmarks import grid

    grid.run_grid(grid.parse_args(argv), on_dataset=lambda result: print(result.report()))
    return 0


def plot_command(argv: list[str]) -> int:
    from kvfactory.benchmarks import efficiency_plots

    args = efficiency_plots.parse_args(argv)
    for path in efficiency_plots.plot_results_dir(args.results_dir, args.time_metric):
        print(path)
    return 0


COMMANDS = {"suffix": suffix, "streaming": streaming, "grid": grid_command, "plot": plot_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from kvfactory.benchmarks.common import configure_logging

    configure_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError) as error:  # one line naming what was wrong, no traceback
        print(f"run_ppl.py {argv[0]}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
