"""One worker per job store: an exclusive lock on `outputs/.fluxgym/worker.lock`.

The lock is an OS file lock (flock on POSIX, msvcrt on Windows), so it goes away with the process that
held it, even after kill -9; no stale lock file ever blocks a restarted worker. The file also records the
holder's pid so a refused second worker can name it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

LOCK_NAME = "worker.lock"


class WorkerBusyError(RuntimeError):
    """Another worker already runs jobs from this store."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class WorkerLock:
    """Held for the worker's lifetime; `release()` (or process exit) frees it."""

    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> int | None:
        try:
            return int(json.loads(self.path.read_text(encoding="utf-8"))["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            pid = self.holder()
            who = f"pid {pid}" if pid else "another process"
            raise WorkerBusyError(
                f"another fluxgym worker ({who}) is already running jobs from this project (lock: {self.path}); "
                f"stop that one first, or let it run the queue: `queue add` jobs reach it by themselves", pid)
        # Written after locking: only the holder ever writes, so a reader sees the holder's pid.
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
