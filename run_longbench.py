"""LongBench v1 under KV-cache compression (CLI over :mod:`kvfactory.benchmarks.longbench`).

Predict (KVCache-Factory's flags)::

    python run_longbench.py --method snapkv --max_capacity_prompts 128 --datasets multi_news,multifieldqa_zh \\
        --data_dir ../shared/data/LongBench --save_dir results_long_bench

Score a results folder (``{save_dir}/{model}_{C}``; writes ``{dataset}/metrics.json`` and ``results.csv``)::

    python run_longbench.py --eval --results_dir results_long_bench/smollm2-135m_128
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from kvfactory.benchmarks.common import add_method_arguments, add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_method_arguments(parser)
    group = parser.add_argument_group("LongBench")
    group.add_argument("--datasets", default=None, help="comma list (default: all 21, or the 13 with --longbench_e)")
    group.add_argument("--longbench_e", action="store_true", help="run the LongBench-E splits ({name}_e.jsonl)")
    group.add_argument("--data_dir", default=None,
                       help="folder of {dataset}.jsonl and config/ (default: data/LongBench, else the shared copy)")
    group.add_argument("--save_dir", default="results_long_bench")
    group.add_argument("--max_length", type=int, default=None,
                       help="prompt tokens kept by middle truncation (default: per model, see docs/longbench.md)")
    group.add_argument("--max_num_examples", type=int, default=None, help="first N samples of each dataset")
    group.add_argument("--eval_batch_size", type=int, default=1)
    group.add_argument("--query_agnostic", action="store_true",
                       help="compress the context alone, then append the question")
    group.add_argument("--eval", action="store_true", help="score --results_dir instead of predicting")
    group.add_argument("--results_dir", type=Path, default=None, help="with --eval: a {save_dir}/{model}_{C} folder")
    return parser


def score(results_dir: Path) -> int:
    from kvfactory.metrics.longbench import score_results

    columns, rows = score_results(results_dir)
    width = max(len(m) for m in rows) + 2
    print(f"{'method':<{width}}" + "".join(f"{c:>{max(len(c), 7) + 2}}" for c in columns))
    for method, row in rows.items():
        cells = "".join(f"{'' if row.get(c) is None else row[c]:>{max(len(c), 7) + 2}}" for c in columns)
        print(f"{method:<{width}}{cells}")
    print(f"-> {results_dir / 'results.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from kvfactory.benchmarks.common import configure_logging

    configure_logging()
    if args.eval:
        if args.results_dir is None:
            parser.error("--eval needs --results_dir")
        try:
            return score(args.results_dir)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    if args.results_dir is not None:
        parser.error("--results_dir is only for --eval (predictions go to --save_dir)")
    from kvfactory.benchmarks.longbench import run

    started = time.perf_counter()
    try:
        folder = run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    from kvfactory.benchmarks import distributed

    if distributed.is_main():  # data parallel: one report for the run
        print(f"-> {folder} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
