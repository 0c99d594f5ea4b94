"""Disk full, over quota or read-only while writing: one clear `errors.DiskError` instead of a C++ traceback.

- `saving(what, path, ...)` wraps a write (state folder, LoRA file, cache file, sample image): an ENOSPC, EDQUOT
  or EROFS anywhere in the error's cause chain becomes a DiskError that says how much to free and what else to do.
- `hidden_errno(path, ...)` wraps writers that drop errno (torch's zip writer: "enforce fail at
  inline_container.cc ... unexpected pos"; safetensors' Rust writer): it asks the filesystem instead (now
  read-only, or less free space than the write needed) and re-raises as an OSError carrying the errno.
  Use it inside the temp folder, before the failed write is cleaned up and the space comes back.
Stdlib only.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from library.errors import DiskError

MB = 1024 * 1024
LOW_SPACE_BYTES = 1 * MB  # with no size to compare against, less than this free counts as full
_EDQUOT = getattr(errno, "EDQUOT", None)
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS} | ({_EDQUOT} if _EDQUOT is not None else set())

HINT_CHECKPOINT = ("or use --save_last_n_epochs/--save_last_n_steps (and --save_last_n_epochs_state/"
                   "--save_last_n_steps_state) to keep fewer checkpoints. The previous checkpoint is intact; "
                   "continue with --resume auto once there is room")
HINT_CACHE = ("or move the dataset to a disk with room (the caches are written next to the images); "
              "caches already written are kept")
HINT_SAMPLE = "or sample less often (--sample_every_n_steps / --sample_every_n_epochs); checkpoints are intact"


def _existing(path: Path) -> Path:
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def free_bytes(path: os.PathLike | str) -> int | None:
    """Free space for this user on the filesystem holding `path` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return None


def is_read_only(path: os.PathLike | str) -> bool:
    statvfs = getattr(os, "statvfs", None)
    if statvfs is None:
        return False
    try:
        return bool(statvfs(_existing(Path(path))).f_flag & getattr(os, "ST_RDONLY", 1))
    except OSError:
        return False


def disk_errno(exc: BaseException | None) -> int | None:
    """ENOSPC/EDQUOT/EROFS of `exc` or of any exception in its cause/context chain, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def hidden_errno(path: os.PathLike | str, *, needed_bytes: Callable[[], int] | int | None = None) -> Iterator[None]:
    """Give an errno back to a failed write whose writer hid it, judged by the filesystem's state now."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DiskError) or disk_errno(exc) is not None:
            raise
        if is_read_only(path):
            raise OSError(errno.EROFS, "Read-only file system (the write failed; the filesystem is read-only)",
                          str(path)) from exc
        free = free_bytes(path)
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        if free is not None and free < max(needed or 0, LOW_SPACE_BYTES):
            raise OSError(errno.ENOSPC, f"No space left on device (the write failed with {free} bytes free)",
                          str(path)) from exc
        raise


@contextlib.contextmanager
def saving(what: str, path: os.PathLike | str, *, needed_bytes: Callable[[], int] | int | None = None,
           hint: str = HINT_CHECKPOINT) -> Iterator[None]:
    """Turn a disk-full / quota / read-only failure of the write in the block into a DiskError."""
    try:
        yield
    except DiskError:
        raise
    except Exception as exc:
        code = disk_errno(exc)
        if code is None:
            raise
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        raise DiskError(disk_message(code, what, Path(path), needed, hint)) from exc


def human_size(n: float) -> str:
    """Bytes in the unit a person reads at a glance: 12 KB, 3.4 MB, 850 MB, 1.3 GB."""
    n = max(n, 0)
    if n < MB:
        return f"{max(1, round(n / 1024))} KB"
    if n < 10 * MB:
        return f"{n / MB:.1f} MB"
    if n < 1024 * MB:
        return f"{n / MB:.0f} MB"
    return f"{n / (1024 * MB):.1f} GB"


def disk_message(code: int, what: str, path: Path, needed: int | None, hint: str = HINT_CHECKPOINT) -> str:
    if code == errno.EROFS:
        return (f"the disk is read-only: could not save {what} to {path}. Remount it read-write (check it for "
                f"errors first) or write to another folder (--output_dir for checkpoints and samples); "
                f"files already written are intact.")
    free = free_bytes(path)
    if needed and free is not None:
        # a margin: the size is an estimate, and other writers share the disk
        to_free = f"free at least {human_size(max(needed - free, 0) * 1.1 + MB)}"
    else:
        to_free = "free some space"
    size = f"it needs about {human_size(needed)}" if needed else "its size is unknown"
    now = f", {human_size(free)} are free now" if free is not None else ""
    head = "disk quota exceeded" if code == _EDQUOT else "disk full"
    return f"{head} while saving {what} to {path} ({size}{now}): {to_free} {hint}."
