"""Passkey retrieval over a grid of prompt lengths × depths (× seeds), under one method and budget.

A 5-digit key is hidden in Paul Graham essays (``--haystack essays``, default when they are found) or in the
paper's repeated filler (``--haystack synthetic``), asked for at the end, and scored by whether the answer's first
number is the key. Resumable: results go to ``{save_dir}/{model}_{C}/{method}.jsonl``, one record per prompt::

    python run_passkey.py --model_path qwen2.5-coder-0.5b --method snapkv --max_capacity_prompts 256 \\
        --lengths 2048,4096,8192 --depths 0,25,50,75,100
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
    group = parser.add_argument_group("passkey grid")
    group.add_argument("--lengths", default="2048,4096,8192", help="prompt lengths in tokens, comma-separated")
    group.add_argument("--depths", default="0,25,50,75,100", help="key depths in percent (0 = start), comma-separated")
    group.add_argument("--seeds", type=int, default=1, help="keys per (length, depth); seed s gives the same key everywhere")
    group.add_argument("--haystack", default="essays", choices=["essays", "synthetic"])
    group.add_argument("--haystack_dir", default=None, help="folder of *.txt essays (default: data/ or the shared copy)")
    group.add_argument("--max_new_tokens", type=int, default=12)
    group.add_argument("--eval_batch_size", type=int, default=1)
    group.add_argument("--save_dir", default="results_passkey")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from kvfactory.benchmarks.common import configure_logging

    configure_logging()
    from kvfactory.benchmarks.common import parse_list

    try:
        lengths = parse_list(args.lengths, int)
        depths = parse_list(args.depths, int)
    except ValueError:
        parser.error(f"--lengths and --depths take comma-separated integers, got {args.lengths!r} and {args.depths!r}")
    if not lengths or min(lengths) < 64:
        parser.error(f"--lengths needs prompt lengths of at least 64 tokens, got {args.lengths!r}")
    if not depths or not all(0 <= depth <= 100 for depth in depths):
        parser.error(f"--depths takes percentages in [0, 100], got {args.depths!r}")
    if args.seeds < 1 or args.eval_batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--seeds, --eval_batch_size and --max_new_tokens must be at least 1")
    started = time.perf_counter()
    try:
        folder, table = run(args, lengths, depths)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"{'length':>8}" + "".join(f"{f'd{depth}':>8}" for depth in depths) + f"{'all':>9}")
    for length, row in table.items():
        found, total = sum(cell[0] for cell in row.values()), sum(cell[1] for cell in row.values())
        print(f"{length:>8}" + "".join(f"{f'{row[d][0]}/{row[d][1]}' if d in row else '-':>8}" for d in depths)
              + f"{f'{found}/{total}':>9}")
    print(f"-> {folder} ({time.perf_counter() - started:.1f} s)")
    return 0


def run(args: argparse.Namespace, lengths: list[int], depths: list[int]) -> tuple[Path, dict]:
    import kvfactory
    from kvfactory.benchmarks import passkey
    from kvfactory.benchmarks.common import (
        ResultsFile, budget_label, load_model, method_label, model_label, model_stop_token_ids, patch_parameters,
        run_jobs,
    )
    from kvfactory.benchmarks.needle_haystack import default_haystack_dir, load_haystack_text
    from kvfactory.benchmarks.provenance import file_fingerprint, model_settings, record_run

    name, params = patch_parameters(args)
    haystack_dir = (args.haystack_dir or default_haystack_dir()) if args.haystack == "essays" else None
    haystack = load_haystack_text(haystack_dir) if args.haystack == "essays" else None
    folder = Path(args.save_dir) / f"{model_label(args.model_path)}_{budget_label(args)}"
    label = method_label(name, params)
    results_path = folder / f"{label}.jsonl"
    meta_path = folder / f"run_meta_{label}.json"
    # what defines the answers: a resume must match it (the grid of lengths, depths and seeds may grow)
    settings = {**model_settings(args), "method": name, "params": params, "haystack": args.haystack,
                "max_new_tokens": args.max_new_tokens,
                "data": {f"essays/{path.name}": file_fingerprint(path)
                         for path in sorted(Path(haystack_dir).glob("*.txt"))} if haystack_dir else {}}

    def has_results() -> bool:
        return results_path.is_file() and results_path.stat().st_size > 0

    record_run(meta_path, settings, args=args, has_results=has_results, check_only=True)  # before the model loads
    model, tokenizer = load_model(args)
    if tokenizer is None:
        raise ValueError(f"{args.model_path!r} has no tokenizer; the passkey grid needs a real checkpoint")
    stops = model_stop_token_ids(model, tokenizer)
    jobs = passkey.grid_jobs(tokenizer, lengths, depths, args.seeds, stops, haystack=haystack,
                             max_new_tokens=args.max_new_tokens)
    record_run(meta_path, settings, args=args, has_results=has_results,
               extra={"lengths": lengths, "depths": depths, "seeds": args.seeds})
    results = ResultsFile(results_path, "_id")
    with kvfactory.patch(model, name, **params) as handle:
        run_jobs(model, tokenizer, handle, jobs, results, batch_size=args.eval_batch_size, description=label)
    wanted = {job.key for job in jobs}
    return folder, passkey.summarize([record for record in results.records if record["_id"] in wanted])


if __name__ == "__main__":
    sys.exit(main())
