"""Markdown tables of ``benchmarks/frontier_needle_passkey.sh``'s results: per method, passkey hits and needle recall
at each depth.

    python -m benchmarks.frontier_needle_passkey_table [benchmarks/results/methods/<model> ...]

A passkey cell is ``1``/``0`` (the key found or not; with the answer when missed), a needle cell the answer's recall
of the needle's words. Methods not run yet are left out; cells not run yet are ``-``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvfactory.benchmarks.passkey import passkey_found

ROOT = Path(__file__).resolve().parent / "results" / "methods"
ORDER = ["fullkv", "snapkv", "tova", "expected_attention", "kvzip", "duo_attention", "criticalkv", "keydiff", "think",
         "quest", "chunkkv", "simlayerkv"]
DEPTHS = [0, 25, 50, 75, 100]


def passkey_cells(folder: Path) -> dict[str, dict[int, str]]:
    """``{method: {depth: cell}}`` from every ``passkey/*/<method>.jsonl`` under ``folder``."""
    table: dict[str, dict[int, str]] = {}
    for path in sorted(folder.glob("passkey/*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            hit = passkey_found(record["pred"], record["passkey"])
            table.setdefault(path.stem, {})[record["depth"]] = "1" if hit else f"0 (`{record['pred'].strip()[:12]}`)"
    return table


def needle_cells(folder: Path) -> dict[str, dict[int, float]]:
    """``{method: {depth: recall}}`` from every ``needle/*/len_*_results.json`` under ``folder``."""
    table: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("needle/*/len_*_results.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        table.setdefault(record["method"], {})[round(record["depth_percent"])] = record["recall"]
    return table


def markdown(folder: Path) -> str:
    passkey, needle = passkey_cells(folder), needle_cells(folder)
    methods = [m for m in ORDER if m in passkey or m in needle] + sorted((set(passkey) | set(needle)) - set(ORDER))
    depth_header = " | ".join(f"{d}%" for d in DEPTHS)
    lines = [f"| method | passkey {depth_header} | found | needle recall {depth_header} | mean |",
             "|---|" + "---|" * (2 * len(DEPTHS) + 2)]
    for method in methods:
        keys, recalls = passkey.get(method, {}), needle.get(method, {})
        found = sum(cell == "1" for cell in keys.values())
        mean = f"{sum(recalls.values()) / len(recalls):.2f}" if recalls else "-"
        lines.append(f"| `{method}` | " + " | ".join(keys.get(d, "-") for d in DEPTHS) + f" | {found}/{len(keys)} | "
                     + " | ".join(f"{recalls[d]:.2f}" if d in recalls else "-" for d in DEPTHS) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    folders = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)] or sorted(
        path for path in ROOT.iterdir() if path.is_dir())
    for folder in folders:
        print(f"{folder.name}\n\n{markdown(folder)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
