"""kvcompress's table (docs/predecessors.md §B, ``scripts/predecessors/kvcompress.sh``): its eight methods at cache
sizes 512 and 1024 on one PG-essay stream, and its four figures. The measurements are
:mod:`kvfactory.benchmarks.kvcompress_table`'s; this is its command line, which prints the table.

``python -m benchmarks.kvcompress_table --model_path smollm2-135m --sizes 512,1024 [--no_speed] [--figures_dir DIR]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from kvfactory.benchmarks import ppl
from kvfactory.benchmarks.common import add_model_arguments, configure_logging, load_model, model_label
from kvfactory.benchmarks.kvcompress_table import METHODS, plot_table, run
from kvfactory.benchmarks.speed import write_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--dataset", default=ppl.DEFAULT_DATASET)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--sizes", default="512,1024", help="cache sizes (kvcompress: 512 and 1024)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num_eval_tokens", type=int, default=2000, help="tokens of the stream scored (kvcompress 2000)")
    parser.add_argument("--chunk", type=int, default=128, help="tokens fed between compressions")
    parser.add_argument("--speed_prompt", type=int, default=1024, help="prompt length of the timing runs")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no_speed", action="store_true")
    parser.add_argument("--output_dir", type=Path, default=Path("results_predecessors"))
    parser.add_argument("--figures_dir", type=Path, default=None, help="also copy the figures here")
    args = parser.parse_args(argv)
    configure_logging()
    model, tokenizer = load_model(args)
    tokens = ppl.token_stream(tokenizer, ppl.load_documents(args.dataset, args.data_dir))[: args.num_eval_tokens]
    rows = run(model, tokens, [int(s) for s in args.sizes.split(",")], chunk=args.chunk,
               speed_prompt=args.speed_prompt, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
               methods=args.methods.split(","), speed=not args.no_speed)
    label = model_label(args.model_path)
    folder = args.output_dir / "kvcompress"
    write_rows(rows, folder / f"{label}_{args.dataset}_kvcompress")
    title = f"{label}, {len(tokens)} tokens of {args.dataset}"
    paths = plot_table(rows, folder, title)
    if args.figures_dir is not None:
        args.figures_dir.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, args.figures_dir / f"predecessors_{path.name}")
    columns = ["label", "ppl", "next_token_acc", "kv_tokens", "ttft_seconds", "tpot_seconds",
               "throughput_tokens_per_second"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))
    print(json.dumps([str(p) for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
