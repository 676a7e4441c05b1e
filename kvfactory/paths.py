"""Where kvfactory finds data that is not part of the repository."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """The shared benchmark-data folder, if one exists.

    Looks at ``$KVFACTORY_SHARED_DATA`` first, then at ``../shared/data`` beside the checkout (the layout of this
    workplace and its CI). Returns ``None`` when neither exists, so callers can fall back to generated fixtures.
    """
    env = os.environ.get("KVFACTORY_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def cache_dir() -> Path:
    """Folder for converted checkpoints and other derived artefacts (``$KVFACTORY_CACHE`` or ~/.cache/kvfactory)."""
    root = os.environ.get("KVFACTORY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvfactory")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_text_files(paths: Iterable[str | Path]) -> str:
    """The files' UTF-8 texts concatenated with no separator, newlines normalized to ``\n`` (cached per path list):
    the needle and RULER essay haystacks."""
    return _read_text_files(tuple(str(path) for path in paths))


@functools.lru_cache(maxsize=8)
def _read_text_files(paths: tuple[str, ...]) -> str:
    parts = []
    for path in paths:
        with open(path, "rb") as handle:
            parts.append(handle.read().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n"))
    return "".join(parts)
