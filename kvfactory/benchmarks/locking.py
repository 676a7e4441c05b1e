"""Exclusive file locks and atomic writes for results that several processes (or a killed one) may touch.

- :class:`FileLock`: ``fcntl.flock`` on a sidecar ``*.lock`` file (never on the data file itself, which atomic
  rewrites replace). The holder writes its pid, host and start time into the lock file, so a waiting process can
  say who holds it. The kernel drops the lock when its holder dies (``kill -9`` included): no stale locks.
- :func:`atomic_write_bytes`: a unique temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of
  the folder: a reader sees the old content or the new one, never a part.
"""
from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

__all__ = ["FileLock", "LockTimeout", "atomic_write_bytes", "atomic_write_text", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"


class LockTimeout(RuntimeError):
    """The lock was still held by another process after the timeout."""


class FileLock:
    """An exclusive, re-entrant-per-instance ``flock`` on ``path`` (created if absent).

    Parameters
    ----------
    path
        The lock file (e.g. ``results.jsonl.lock``).
    timeout
        Seconds to wait for another holder; ``None`` waits forever, ``0`` refuses at once.
    """

    def __init__(self, path: str | Path, timeout: float | None = None) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._fd: int | None = None
        self._depth = 0

    def holder(self) -> str:
        """What the current holder wrote into the lock file (``pid N on HOST since T``), or ``unknown``."""
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> "FileLock":
        if self._depth:
            self._depth += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        started, warned = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if self.timeout is not None and waited >= self.timeout:
                    holder = self.holder()
                    os.close(fd)
                    raise LockTimeout(f"{self.path} is held by {holder} (waited {waited:.0f} s); wait for that run "
                                      "to finish or use another --save_dir") from None
                if not warned and waited > 2.0:
                    logger.info("waiting for %s, held by %s", self.path, self.holder())
                    warned = True
                time.sleep(0.01)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd, self._depth = fd, 1
        return self

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (unique temporary ``.{name}.{pid}.tmp`` beside it, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete ``.{name}.{pid}.tmp`` files left by dead processes (a kill between write and rename); returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for path in folder.glob(f".*{TEMP_SUFFIX}"):
        try:
            pid = int(path.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):  # a live pid may be mid-write (pids are per host: shared folders keep theirs)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed
