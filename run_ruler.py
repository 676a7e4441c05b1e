"""RULER (Hsieh et al. 2024) on a KV-cache-compressed model: the 13 tasks generated offline for the model's own
tokenizer at any length (or replayed from RULER-format files), answered greedily, scored as RULER's evaluate.py.

Example (SmolLM2 on CPU, four methods at C=128, 10 samples per task at 1024 tokens):

    python run_ruler.py --method fullkv,snapkv,pyramidkv,streamingllm --max_capacity_prompts 128 \\
        --context_lengths 1024 --num_samples 10 --template chat --eval_batch_size 10

Results: {save_dir}/{model}_{C}/{length}/{task}/{method}.jsonl, metrics.json per task, results.csv (see
docs/ruler.md). Re-score a results folder (what scripts/ruler/metrics.sh runs):

    python run_ruler.py --eval --results_dir results_ruler/smollm2-135m_128
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kvfactory.benchmarks.common import add_method_arguments, add_model_arguments
from kvfactory.benchmarks.ruler import SampleDoesNotFit
from kvfactory.benchmarks.ruler.runner import add_ruler_arguments, run_ruler
from kvfactory.metrics.ruler import format_table, score_results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_ruler_arguments(parser)
    parser.set_defaults(seed=42)  # RULER's random_seed
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--eval", action="store_true", help="score --results_dir instead of predicting")
    scoring.add_argument("--results_dir", type=Path, default=None,
                         help="with --eval: a {save_dir}/{model}_{C} folder of {length}/{task}/{method}.jsonl")
    return parser


def score(results_dir: Path, parser: argparse.ArgumentParser) -> int:
    """Score ``results_dir`` (writes metrics.json per task and results.csv) and print the table."""
    try:
        scores = score_results(results_dir)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not scores:
        parser.error(f"no {{length}}/{{task}}/{{method}}.jsonl results under {results_dir}")
    print(format_table(scores))
    print(f"written: {results_dir / 'results.csv'} and per-task metrics.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.eval:
        if args.results_dir is None:
            parser.error("--eval needs --results_dir")
        return score(args.results_dir, parser)
    if args.results_dir is not None:
        parser.error("--results_dir is only for --eval (predictions go to --save_dir)")
    try:
        run = run_ruler(args)
    except (ValueError, KeyError, SampleDoesNotFit) as error:
        parser.error(str(error))
    from kvfactory.benchmarks import distributed

    if not distributed.is_main():  # data parallel: rank 0 scores and reports the whole run
        return 0
    for cell, reason in run.skipped.items():
        print(f"skipped {cell}: {reason}")
    if not run.scores:
        print("nothing was scored: every task was skipped", file=sys.stderr)
        return 1
    print(format_table(run.scores, seconds=run.seconds))
    print("answers this run: " + ", ".join(f"{m} {n} in {run.seconds[m]:.0f}s" for m, n in run.generated.items()))
    print(f"results: {run.run_dir}/results.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
