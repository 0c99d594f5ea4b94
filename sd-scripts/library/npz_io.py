"""Bounded reads and atomic writes of `.npz` cache files.

- `bounded_npz_load`: open the file AND materialise every requested array inside one time bound, so a
  stalled disk, a hung network mount or a FIFO cannot block training forever.
- `atomic_savez`: write to a temp file in the same folder, fsync, then `os.replace`, so a killed writer
  never leaves a half-written file under the final name.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from library import disk_errors
from library.atomic_io import atomic_file, parse_leftover, pid_alive
from library.errors import HangError
from library.fault_injection import inject_point

logger = logging.getLogger(__name__)


class CacheReadTimeout(HangError):
    """A cache file could not be read within `--cache_io_timeout` seconds (hang site `cache_io`)."""

    def __init__(self, path: os.PathLike | str, timeout: float | None = None):
        self.path = str(path)
        self.timeout = timeout
        if timeout is None:
            # torch re-raises a worker's exception as exc_type(message): keep the message as is
            super().__init__(self.path)
            return
        super().__init__(
            f"reading cache file {self.path} did not finish within {timeout:g} s (--cache_io_timeout). "
            "The disk or network mount may be stalled. Check the storage, raise --cache_io_timeout, "
            "or delete the file so it is re-made."
        )


class _AlarmFired(BaseException):
    """Raised by our SIGALRM handler; BaseException so library code's `except Exception` can't swallow it."""


def _read_arrays(path: Path, keys) -> dict[str, np.ndarray]:
    inject_point("cache_io")
    # np.load on an npz only reads the zip directory; the real I/O happens per key, so copy every
    # array out while we are still inside the bound.
    with np.load(path, allow_pickle=False) as npz:
        names = list(npz.files) if keys is None else list(keys)
        missing = [k for k in names if k not in npz.files]
        if missing:
            raise KeyError(f"{path}: missing key(s) {', '.join(missing)}")
        return {k: np.array(npz[k]) for k in names}


def _in_dataloader_worker() -> bool:
    # Only ask torch if it is already imported: this module must stay cheap to import.
    data_mod = sys.modules.get("torch.utils.data")
    get_info = getattr(data_mod, "get_worker_info", None)
    return bool(get_info and get_info() is not None)


def _can_use_alarm() -> bool:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False  # signal handlers may only be installed from the main thread
    if _in_dataloader_worker():
        # Inside DataLoader workers we use the thread deadline: an exception raised from a signal could
        # land inside torch's worker loop after our read has finished.
        return False
    # Only one ITIMER_REAL per process: never clobber an alarm someone else armed.
    return signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def _load_with_alarm(path: Path, keys, timeout: float) -> dict[str, np.ndarray]:
    def _on_alarm(signum, frame):
        raise _AlarmFired()

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return _read_arrays(path, keys)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _AlarmFired:
        raise CacheReadTimeout(path, timeout) from None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _load_with_thread(path: Path, keys, timeout: float) -> dict[str, np.ndarray]:
    result: dict = {}
    done = threading.Event()

    def _work():
        try:
            result["value"] = _read_arrays(path, keys)
        except BaseException as exc:  # handed to the waiting caller below
            result["error"] = exc
        finally:
            done.set()

    # Daemon: if the read is stuck in the kernel the thread can't be stopped; the caller stops waiting
    # and the thread dies with the process.
    worker = threading.Thread(target=_work, name=f"npz-read:{path.name}", daemon=True)
    worker.start()
    if not done.wait(timeout):  # Event.wait, not join(): join under a signal can mis-mark the thread
        raise CacheReadTimeout(path, timeout)
    if "error" in result:
        raise result["error"]
    return result["value"]


def bounded_npz_load(path: os.PathLike | str, *, timeout: float | None, keys=None) -> dict[str, np.ndarray]:
    """Read `keys` (all when None) from an npz file; raise CacheReadTimeout after `timeout` seconds.

    `timeout` None or <= 0 means unbounded. Corrupt files raise what numpy/zipfile raise (ValueError,
    zipfile.BadZipFile, EOFError, OSError) and a missing key raises KeyError; callers decide to re-make.
    """
    # FIX: upstream bounds nothing around np.load, and reads arrays lazily after the open: a dead network mount
    # or a FIFO hung the run forever. Open and every array read happen inside one --cache_io_timeout bound.
    path = Path(path)
    if not timeout or timeout <= 0:
        return _read_arrays(path, keys)
    if _can_use_alarm():
        return _load_with_alarm(path, keys, float(timeout))
    return _load_with_thread(path, keys, float(timeout))


def atomic_savez(path: os.PathLike | str, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` as an uncompressed npz at exactly `path` (no `.npz` is appended), atomically."""
    # FIX: a run killed mid-write left a truncated cache that later crashed (or was reused): temp + rename.
    final = Path(path)
    needed = sum(a.nbytes for a in arrays.values()) + 4096
    with disk_errors.saving("a cache file", final, needed_bytes=needed, hint=disk_errors.HINT_CACHE), \
            atomic_file(final) as tmp:
        # Writing through a file object stops numpy from appending ".npz" to the temp name.
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return final


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temp files a killed writer left for `final`; they are never read as caches anyway."""
    removed = []
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        parsed = parse_leftover(leftover.name)
        if parsed is not None and parsed[2] is not None and pid_alive(parsed[2]):
            continue  # another live process (a second trainer on the same folder) is writing it
        try:
            leftover.unlink()
            removed.append(leftover)
        except OSError as exc:
            logger.warning("could not remove leftover temp file %s: %s", leftover, exc)
    return removed
