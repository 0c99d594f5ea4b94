"""One trainer per output folder: an exclusive lock file held for the whole run.

- `acquire_output_lock(output_dir, command=...)` locks `OUTPUT_DIR/.trainer.lock` and writes who holds it
  (pid, process start time, host, command); a second trainer gets `errors.FolderInUseError` within seconds.
- The lock is an OS lock on an open file (`fcntl.flock` / `msvcrt.locking`): the OS drops it when the holder
  dies, however it dies, so a killed trainer never blocks the next one. The file itself stays (emptied).
- `read_lock_holder(output_dir)` tells other tools (status, supervisor) whether a trainer holds the folder.
Stdlib only: tools import it without torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from library import errors
from library.atomic_io import read_json_object

LOCK_NAME = ".trainer.lock"
# Windows locks are mandatory byte-range locks: lock one byte far past the JSON so readers can still read it.
_WIN_LOCK_OFFSET = 1 << 30
# A reader (status, supervisor) probes the lock for a moment; a starting trainer retries past such probes.
_ACQUIRE_RETRY_S = 1.0
_RETRY_SLEEP_S = 0.05
_COMMAND_SHOWN = 400  # characters of the holder's command in the message (FluxGym argv are long)

if os.name == "nt":
    import msvcrt
else:
    import fcntl


class _LockUnsupported(OSError):
    """The filesystem cannot lock files (some FUSE or old network mounts)."""


def _try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the lock without waiting; False when another process holds it."""
    if os.name == "nt":
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOLCK / EOPNOTSUPP: no locking on this filesystem
        raise _LockUnsupported(exc.errno, exc.strerror) from exc
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def is_global_main_process() -> bool:
    """Rank 0 of the whole run (torchrun/accelerate set RANK in every worker); a plain start is rank 0."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def process_start_time(pid: int | None = None) -> float | None:
    """When a process started (seconds since the epoch), from /proc on Linux; None where unknown.

    Recorded with the pid so a reader can tell the holder from a later process that reused its pid.
    """
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22 (starttime), counted after "pid (comm)"
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


class OutputLock:
    """The held lock; `release()` (or leaving the `with` block) gives it up. Exiting the process does too."""

    def __init__(self, path: Path, fd: int | None, info: dict):
        self.path = path
        self._fd = fd  # None: the filesystem cannot lock, nothing is held
        self.info = info

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty file never names a holder that is gone
        with contextlib.suppress(OSError):
            _unlock(fd)
        os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_info(fd: int, info: dict) -> None:
    data = (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    while data:
        data = data[os.write(fd, data):]


def _open_lock_file(path: Path) -> int:
    # No O_TRUNC: opening must never erase the holder's record before we know we hold the lock.
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)


def _folder_error(output_dir: Path, exc: OSError) -> errors.UserError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)):
        return errors.DiskError(f"--output_dir {output_dir}: cannot write the lock file ({exc.strerror}); "
                                "free space or choose another --output_dir")
    return errors.BadFileError(f"--output_dir {output_dir}: cannot create or write in it ({exc.strerror}); "
                               "check the path and its permissions, or choose another --output_dir")


def acquire_output_lock(output_dir: Path, *, command: list[str]) -> OutputLock:
    """Lock `output_dir` for this process (creating the folder); raise FolderInUseError when a trainer has it."""
    output_dir = Path(output_dir)
    path = output_dir / LOCK_NAME
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_file(path)
    except OSError as exc:
        raise _folder_error(output_dir, exc) from exc
    info = {"pid": os.getpid(), "process_start": process_start_time(), "host": socket.gethostname(),
            "command": [str(c) for c in command], "output_dir": str(output_dir.resolve()),
            "acquired": time.time()}
    deadline = time.monotonic() + _ACQUIRE_RETRY_S
    try:
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                holder = read_json_object(path) or {}
                os.close(fd)
                raise errors.FolderInUseError(in_use_message(output_dir, holder))
            time.sleep(_RETRY_SLEEP_S)
    except _LockUnsupported as exc:
        os.close(fd)
        print(f"warning: {output_dir} cannot be locked ({exc.strerror}); make sure no other trainer writes to it",
              file=sys.stderr)
        return OutputLock(path, None, info)
    try:
        _write_info(fd, info)
    except OSError as exc:
        with contextlib.suppress(OSError):
            _unlock(fd)
        os.close(fd)
        raise _folder_error(output_dir, exc) from exc
    return OutputLock(path, fd, info)


def in_use_message(output_dir: Path, holder: dict) -> str:
    pid = holder.get("pid")
    command = holder.get("command") or []
    shown = shlex.join(command) if isinstance(command, list) else str(command)
    if len(shown) > _COMMAND_SHOWN:
        shown = shown[:_COMMAND_SHOWN] + " ..."
    where = f" on {holder['host']}" if holder.get("host") and holder.get("host") != socket.gethostname() else ""
    since = ""
    if isinstance(holder.get("acquired"), (int, float)):
        since = f", running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['acquired']))}"
    who = f"pid {pid}{where}{since}" if pid else "a process that is still starting"
    stop = f"taskkill /PID {pid}" if os.name == "nt" else f"kill {pid}"
    return (f"output folder {output_dir} is in use by another trainer ({who}): {shown or '(command unknown)'}. "
            f"Wait for it to finish or stop it (Ctrl-C in its terminal, `python -m fluxgym stop NAME` for a FluxGym "
            f"run, or `{stop}`), or choose another --output_dir / --output_name folder.")


def read_lock_holder(output_dir: Path) -> dict | None:
    """Who holds `output_dir`'s lock: the holder's record (pid, process_start, host, command, ...) or None.

    The answer comes from the OS lock itself, so a record left by a dead trainer is never reported. Where the
    filesystem cannot lock, a record whose pid is alive on this host is reported.
    """
    path = Path(output_dir) / LOCK_NAME
    try:
        # Read-only is enough to test a lock, and works on another user's lock file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        try:
            free = _try_lock(fd, shared=True)
        except _LockUnsupported:
            info = read_json_object(path)
            return info if info and info.get("host") == socket.gethostname() and _pid_alive(info.get("pid")) else None
        if free:
            _unlock(fd)
            return None
        # Held: the holder writes its record right after locking, so an empty file is only a moment old.
        for _ in range(20):
            info = read_json_object(path)
            if info:
                return info
            time.sleep(0.025)
        return {"pid": None, "command": None}
    finally:
        os.close(fd)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    from library.atomic_io import pid_alive

    return pid == os.getpid() or pid_alive(pid)
