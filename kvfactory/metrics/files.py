"""Result files the scorers share."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


def merge_metrics_json(folder: Path, scores: dict[str, Any], *, indent: int = 2) -> Path:
    """Write ``{folder}/metrics.json`` as ``{method: score}``, merged into what is there, so scoring one method never
    erases another's score; an unreadable file is rewritten with a warning."""
    path = Path(folder) / "metrics.json"
    merged: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; rewriting it", path)
        else:
            if isinstance(existing, dict):
                merged.update(existing)
    merged.update(scores)
    path.write_text(json.dumps(merged, indent=indent, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return path


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of every non-blank line of a results file; a line that is not JSON (a write cut
    by a crash) is skipped with a warning naming it."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                logger.warning("%s:%d: skipped, not valid JSON (%s)", path, number, error.msg)
