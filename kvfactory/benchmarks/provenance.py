"""One resume rule for every runner: a results folder holds results of exactly one set of defining settings.

``run_meta*.json`` holds

- ``settings``: what defines the results (model, resolved dtype, attention, seed, method and its parameters, the
  protocol flags, and a ``data`` fingerprint: name → size and SHA-256 of each input file or sample set). Written by
  the first run and never overwritten while results exist;
- ``history``: one entry per invocation (git commit, arguments, versions, device, time, runner extras), appended;
- the first invocation's fields at the top level (``git_commit``, ``args``, ...), as before.

:func:`record_run` refuses (:class:`SettingsMismatch`, a ``ValueError``) a run whose settings differ from the stored
ones in anything, naming each changed setting with both values, unless the folder holds no results yet (an earlier
run stopped before its first record): then the stored settings are replaced. ``data`` entries are compared for the
names both runs use; new names (another dataset, length or task) are added. A meta file of an older kvfactory
(without ``settings``) is adopted with a warning: its results cannot be checked.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch

from kvfactory.benchmarks.locking import FileLock, atomic_write_text

__all__ = ["SettingsMismatch", "file_fingerprint", "ids_fingerprint", "invocation", "record_run", "normalized"]

logger = logging.getLogger(__name__)

_FINGERPRINTS: dict[tuple[str, int, int], dict[str, Any]] = {}


class SettingsMismatch(ValueError):
    """A resume with settings that differ from those of the results already in the folder."""


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file (cached per path, size and mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = {"size": stat.st_size, "sha256": digest.hexdigest()}
    return dict(_FINGERPRINTS[key])


def ids_fingerprint(ids: Any) -> dict[str, Any]:
    """``{"tokens": n, "sha256": hex}`` of a token-id sequence (a haystack, a prompt set)."""
    values = [int(i) for i in ids]
    return {"tokens": len(values), "sha256": hashlib.sha256(json.dumps(values).encode()).hexdigest()}


def normalized(value: Any) -> Any:
    """``value`` as JSON would store it (tuples → lists, paths and other objects → str)."""
    return json.loads(json.dumps(value, default=str))


def invocation(args: argparse.Namespace | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of this process: git commit, arguments, library versions, device, timestamp, ``extra``."""
    import transformers

    import kvfactory
    from kvfactory.benchmarks.common import git_commit

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return normalized({
        "git_commit": git_commit(), "args": vars(args) if args is not None else {}, "torch": torch.__version__,
        "transformers": transformers.__version__, "kvfactory": kvfactory.__version__, "device": device,
        "python": platform.python_version(), "pid": os.getpid(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), **(extra or {}),
    })


#: Settings a resume may raise but not lower (``None`` = all): the first N samples of a file are a prefix of the
#: first M > N, so a run extended to more samples stays one protocol; one asked for fewer than the folder holds is not.
GROWING = ("max_num_examples",)


def _at_least(new: Any, old: Any) -> bool:
    return new is None or (old is not None and new >= old)


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = []
    for key in sorted(set(stored) | set(current)):
        if key in GROWING:
            if not _at_least(current.get(key), stored.get(key)):
                changed.append(f"{key}: {stored.get(key)!r} -> {current.get(key)!r} (the folder holds more; a "
                               f"resume may only extend it)")
        elif key == "data":
            old, new = stored.get("data") or {}, current.get("data") or {}
            changed += [f"data[{name}]: {old[name]} -> {new[name]}" for name in sorted(set(old) & set(new))
                        if old[name] != new[name]]
        elif isinstance(stored.get(key), dict) and isinstance(current.get(key), dict):
            old, new = stored[key], current[key]
            changed += [f"{key}.{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(set(old) | set(new))
                        if old.get(name) != new.get(name)]
        elif stored.get(key) != current.get(key):
            changed.append(f"{key}: {stored.get(key)!r} -> {current.get(key)!r}")
    return changed


def record_run(meta_path: str | Path, settings: dict[str, Any], *, args: argparse.Namespace | None,
               has_results: Callable[[], bool], extra: dict[str, Any] | None = None,
               check_only: bool = False) -> dict[str, Any]:
    """Check ``settings`` against ``meta_path`` and record this invocation there (under a lock); returns the meta.

    ``check_only`` checks without writing (a runner calls it before loading the model, then records after).

    Raises
    ------
    SettingsMismatch
        When the folder holds results made with other settings (the message lists each change, old -> new).
    """
    meta_path = Path(meta_path)
    settings = normalized(settings)
    if check_only and not meta_path.is_file():
        return {"settings": settings, "history": []}
    entry = invocation(args, extra)
    with FileLock(meta_path.with_name(meta_path.name + ".lock")):
        stored: dict[str, Any] | None = None
        if meta_path.is_file():
            try:
                stored = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if has_results():
                    raise SettingsMismatch(f"{meta_path} is not valid JSON ({error}) and the folder holds results: "
                                           "their settings cannot be checked; repair or remove it, or use another "
                                           "--save_dir") from error
                logger.warning("%s is not valid JSON and no results exist yet; rewriting it", meta_path)
        if stored is not None and "settings" not in stored:
            logger.warning("%s was written by an older kvfactory without settings; its results cannot be checked "
                           "against this run's, adopting this run's settings", meta_path)
            stored = {**stored, "settings": settings, "history": [dict(stored)]}
        if stored is not None:
            changed = _differences(stored["settings"], settings)
            if changed and has_results():
                raise SettingsMismatch(
                    f"{meta_path.parent} holds results of this method made with other settings ({'; '.join(changed)}); "
                    "resume with the same settings or use another --save_dir")
            if changed:
                logger.warning("%s: no results yet, replacing the settings of an earlier run (%s)", meta_path,
                               "; ".join(changed))
                stored = None
        if stored is None:
            meta = {**entry, "settings": settings, "history": [entry]}
        else:
            meta = stored
            meta["settings"]["data"] = {**(settings.get("data") or {}), **(meta["settings"].get("data") or {})}
            for key in GROWING:
                if key in settings:
                    meta["settings"][key] = settings[key]
            meta["history"] = [*meta.get("history", []), entry]
        if check_only:
            return meta
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return meta


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model part of a run's settings: checkpoint, resolved dtype, attention, seed, device map."""
    from kvfactory.benchmarks.common import resolve_dtype

    return {"model_path": args.model_path, "dtype": resolve_dtype(args.dtype, args.device_map),
            "attn_implementation": args.attn_implementation, "seed": args.seed}
