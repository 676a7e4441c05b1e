"""Needle-in-a-haystack (CLI): one method and budget over a grid of context lengths × depths, then its heatmap.

    python run_needle.py --method snapkv --max_capacity_prompts 128 --s_len 500 --e_len 1500 --step 250 --num_depths 6
    python run_needle.py --plot results_needle/smollm2-135m_fullkv results_needle/smollm2-135m_snapkv_128

Every cell is one JSON file in ``{save_dir}/{model_version}/`` (cells already there are skipped, so an interrupted
run resumes); the heatmap ``needle_heatmap.png`` is drawn there at the end. ``--plot DIR [DIR ...]`` only draws:
each folder's heatmap, and with several folders one comparison figure. The protocol is described in
``docs/needle.md`` and :mod:`kvfactory.benchmarks.needle_haystack`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from kvfactory.benchmarks.common import add_method_arguments, add_model_arguments
    from kvfactory.benchmarks.needle import HAYSTACK_KINDS
    from kvfactory.benchmarks.needle_haystack import NEEDLE
    from kvfactory.benchmarks.needle_prompt import RETRIEVAL_QUESTION, SF_ANSWER_PREFIX

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_method_arguments(parser)
    grid = parser.add_argument_group("grid")
    grid.add_argument("-s", "--s_len", type=int, default=None, help="shortest context length (default 1000)")
    grid.add_argument("-e", "--e_len", type=int, default=None, help="longest context length (default 8000)")
    grid.add_argument("--step", type=int, default=None, help="length step (default 1000)")
    grid.add_argument("--context_lengths", default=None, help="explicit lengths a,b,c (instead of s_len/e_len/step)")
    grid.add_argument("--num_depths", type=int, default=None,
                      help="N depths evenly spaced over 0-100, rounded (default 10: 0, 11, 22, ..., 100)")
    grid.add_argument("--depths", default=None, help="explicit depths in percent a,b,c (instead of --num_depths)")
    texts = parser.add_argument_group("haystack and needle")
    texts.add_argument("--haystack", default="essays", choices=HAYSTACK_KINDS,
                       help="essays: the *.txt files of --haystack_dir; noise: a repeated neutral sentence")
    texts.add_argument("--haystack_dir", default=None,
                       help="essay folder (default: data/PaulGrahamEssays, else ../shared/data/PaulGrahamEssays)")
    texts.add_argument("--needle", default=NEEDLE, help="default: the San Francisco sandwich sentence")
    texts.add_argument("--retrieval_question", default=RETRIEVAL_QUESTION, help=f"default: {RETRIEVAL_QUESTION!r}")
    texts.add_argument("--answer_prefix", default="",
                       help=f"text the assistant turn starts with; the answer scored is what follows it (default none; "
                            f"for the default needle e.g. {SF_ANSWER_PREFIX!r})")
    texts.add_argument("--no_chat_template", action="store_true",
                       help="plain prompt ending in 'Answer:' even when the tokenizer has a chat template")
    run = parser.add_argument_group("run")
    run.add_argument("--model_version", default=None,
                     help="names the run folder (default {model}_{method}_{C}, {model}_fullkv for the full cache)")
    run.add_argument("--save_dir", type=Path, default=Path("results_needle"), help="parent of the run folders")
    run.add_argument("--max_new_tokens", type=int, default=50, help="answer length cap (greedy; stops at EOS)")
    run.add_argument("--eval_batch_size", type=int, default=1, help="cells answered per batch")
    run.add_argument("--no_plot", action="store_true", help="do not draw the heatmap at the end")
    plot = parser.add_argument_group("plots")
    plot.add_argument("--plot", nargs="+", type=Path, default=None, metavar="DIR",
                      help="only draw (no model is loaded): the heatmap of each results folder and, for several "
                           "folders, a comparison figure")
    plot.add_argument("--plot_out", type=Path, default=None,
                      help="comparison PNG (default: needle_comparison.png beside the first folder)")
    plot.add_argument("--metric", default="recall", choices=["recall", "rouge1_f"],
                      help="score drawn and summarised (default recall: the needle's key words found)")
    plot.add_argument("--layout", default="auto", choices=["auto", "horizontal", "vertical"],
                      help="comparison panels side by side, stacked, or auto (side by side for up to 3 short grids)")
    return parser


def parse_numbers(text: str, cast: type, flag: str, example: str) -> list[Any]:
    """``"a,b,c"`` as a non-empty list of ``cast`` (ValueError naming ``flag`` and an accepted ``example``)."""
    from kvfactory.benchmarks.common import parse_list

    kind = "integers" if cast is int else "numbers"
    try:
        values = parse_list(text, cast)
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag} must be comma-separated {kind} (e.g. {example}), got {text!r}")
    return values


def resolve_grid(args: argparse.Namespace) -> tuple[list[int], list[float]]:
    """The context lengths and depths the arguments ask for (ValueError naming the flag when malformed)."""
    from kvfactory.benchmarks.needle import context_lengths, depth_grid

    range_flags = [args.s_len, args.e_len, args.step]
    if args.context_lengths is not None:
        if any(flag is not None for flag in range_flags):
            raise ValueError("give either --context_lengths or --s_len/--e_len/--step, not both")
        lengths = parse_numbers(args.context_lengths, int, "--context_lengths", "1000,2000,4000")
        if min(lengths) < 1:
            raise ValueError(f"--context_lengths must be positive, got {args.context_lengths!r}")
    else:
        s_len, e_len, step = (value if value is not None else default
                              for value, default in zip(range_flags, (1000, 8000, 1000)))
        lengths = context_lengths(s_len, e_len, step)
    if args.depths is None:
        return lengths, depth_grid(10 if args.num_depths is None else args.num_depths)
    if args.num_depths is not None:
        raise ValueError("give either --depths or --num_depths, not both")
    depths = parse_numbers(args.depths, float, "--depths", "0,50,100")
    bad = [f"{depth:g}" for depth in depths if not 0.0 <= depth <= 100.0]
    if bad:
        raise ValueError(f"--depths are percentages in [0, 100], got {', '.join(bad)}")
    return lengths, depths


def plot(args: argparse.Namespace) -> int:
    from kvfactory import plots

    for folder in args.plot:
        print(f"-> {plots.plot_needle_heatmap(folder, metric=args.metric)}")
    if len(args.plot) > 1:
        out = args.plot_out or args.plot[0].parent / "needle_comparison.png"
        print(f"-> {plots.plot_needle_comparison(args.plot, out, metric=args.metric, layout=args.layout)}")
    return 0


def run_budget(name: str, params: dict[str, Any]) -> int | str | None:
    """The budget stored in each cell: None for the full cache, C, ``ratio{r}``, or ``default`` (the method's)."""
    if name == "fullkv":
        return None
    if "max_capacity_prompt_ratio" in params:
        return f"ratio{params['max_capacity_prompt_ratio']:g}"
    return params.get("max_capacity_prompt", "default")


#: Needle flags that change answers: a resume must match them (the grid may grow: each cell stands alone).
PROTOCOL_ARGS = ("needle", "retrieval_question", "answer_prefix", "no_chat_template", "max_new_tokens", "haystack")


def run_settings(args: argparse.Namespace, name: str, params: dict[str, Any], haystack_dir: Any) -> dict[str, Any]:
    """The settings that define a needle run's cells; ``data`` fingerprints the essay files (see
    :mod:`kvfactory.benchmarks.provenance`)."""
    from kvfactory.benchmarks.provenance import file_fingerprint, model_settings

    data = {}
    if args.haystack == "essays":
        data = {f"essays/{path.name}": file_fingerprint(path) for path in sorted(Path(haystack_dir).glob("*.txt"))}
    return {**model_settings(args), "method": name, "params": params,
            **{key: getattr(args, key) for key in PROTOCOL_ARGS}, "data": data}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import kvfactory
    from kvfactory import plots
    from kvfactory.benchmarks import needle
    from kvfactory.benchmarks.common import (ensure_folder, load_model, method_label, model_label,
                                             model_stop_token_ids, patch_parameters)
    from kvfactory.benchmarks.provenance import record_run
    from kvfactory.quant import QUANT_PARAMETERS
    from kvfactory.benchmarks.needle_haystack import HaystackNotFound, default_haystack_dir, load_haystack_text

    haystack_dir = args.haystack_dir
    try:  # every argument checked before the model loads
        lengths, depths = resolve_grid(args)
        name, params = patch_parameters(args)
        kvfactory.methods.get(name, **{k: v for k, v in params.items() if k not in (*QUANT_PARAMETERS, "nbits")})
        if args.haystack == "essays":
            haystack_dir = haystack_dir or default_haystack_dir()
            load_haystack_text(haystack_dir)  # raises HaystackNotFound with the flags that fix it
        elif haystack_dir is not None:
            raise ValueError("--haystack_dir is for --haystack essays; --haystack noise needs no files")
        if args.max_new_tokens < 1 or args.eval_batch_size < 1:
            raise ValueError(f"--max_new_tokens and --eval_batch_size must be at least 1, got {args.max_new_tokens} "
                             f"and {args.eval_batch_size}")
        model_name, method, budget = model_label(args.model_path), method_label(name, params), run_budget(name, params)
        version = args.model_version or "_".join(str(part) for part in (model_name, method, budget) if part is not None)
        results_dir = ensure_folder(args.save_dir) / version
        settings = run_settings(args, name, params, haystack_dir)
        meta_path = results_dir / "run_meta.json"

        def has_results() -> bool:
            return results_dir.is_dir() and any(results_dir.glob("*_results.json"))

        record_run(meta_path, settings, args=args, has_results=has_results, check_only=True)
        model, tokenizer = load_model(args)
    except (ValueError, HaystackNotFound) as error:
        parser.error(str(error))
    if tokenizer is None:
        parser.error(f"{args.model_path} comes without a tokenizer; the needle test needs a real checkpoint")
    haystack = needle.haystack_ids(tokenizer, args.haystack, haystack_dir, min_tokens=max(lengths))
    spec = needle.NeedleRun(
        results_dir=results_dir, lengths=lengths, depths=depths, model=model_name, method=method,
        budget=budget, version=version, needle=args.needle, question=args.retrieval_question,
        answer_prefix=args.answer_prefix, max_new_tokens=args.max_new_tokens, use_chat_template=not args.no_chat_template,
        haystack=f"essays:{haystack_dir}" if args.haystack == "essays" else "noise")
    from kvfactory.benchmarks import distributed

    rank = distributed.context()
    if rank.is_main:  # one run_meta entry per run, however many workers
        record_run(meta_path, settings, args=args, has_results=has_results,
                   extra={"method_params": params, "lengths": spec.lengths, "depths": spec.depths,
                          "haystack": spec.haystack, "haystack_tokens": len(haystack),
                          "world_size": rank.world_size})
    with kvfactory.patch(model, name, **params) as handle:
        ran = needle.run_needle(model, tokenizer, handle, spec, haystack,
                                stop_token_ids=model_stop_token_ids(model, tokenizer),
                                batch_size=args.eval_batch_size)
    distributed.barrier()  # every worker's cells are in before rank 0 summarises and plots
    if not rank.is_main:
        return 0
    print(f"{ran} cells answered, {len(spec.cells) - ran} already there -> {spec.results_dir}")
    print(needle.format_summary(plots.needle_grid(spec.results_dir, args.metric)))
    if not args.no_plot:
        print(f"-> {plots.plot_needle_heatmap(spec.results_dir, metric=args.metric)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.plot:
        try:
            return plot(args)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    try:
        return run(args, parser)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
