"""Hang hardening helpers called by code that `patches/apply.py` inserted into this sd-scripts checkout.

Installed as `library/fluxtrain_hardening.py` by the fluxtrain patch tool (our own code, not upstream's).
Responsibilities: timeouts from environment variables; DataLoader keyword hardening; a bounded wait on
block-swap futures that hard-exits; bounded, fully materialised `.npz` reads and atomic `.npz` writes;
accelerate state save/load helpers for resume. Stdlib only at import time; numpy/torch are imported lazily.
"""

from __future__ import annotations

import concurrent.futures
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid

logger = logging.getLogger(__name__)

HELPER_VERSION = 1
ENV_DATALOADER_TIMEOUT = "FLUXTRAIN_DATALOADER_TIMEOUT"
ENV_BLOCK_SWAP_TIMEOUT = "FLUXTRAIN_BLOCK_SWAP_TIMEOUT"
ENV_CACHE_IO_TIMEOUT = "FLUXTRAIN_CACHE_IO_TIMEOUT"
DEFAULTS = {ENV_DATALOADER_TIMEOUT: 300.0, ENV_BLOCK_SWAP_TIMEOUT: 60.0, ENV_CACHE_IO_TIMEOUT: 30.0}
HANG_EXIT_CODE = 124  # same code as the fluxtrain trainer's hang guards, so supervisors treat both alike


def env_seconds(name: str) -> float:
    """Seconds from env var `name` (its documented default when unset); 0 or less disables the bound."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULTS[name]
    try:
        return max(float(raw), 0.0)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using the default %s", name, raw, DEFAULTS[name])
        return DEFAULTS[name]


def _injected(site: str) -> bool:
    # Same fault-injection switch as the fluxtrain trainer, so a patched checkout can be hang-tested too.
    return os.environ.get("FLUXTRAIN_INJECT_HANG", "") == site


# --- DataLoader ---------------------------------------------------------------------------------------


def dataloader_timeout(num_workers) -> float:
    """Worker-batch timeout for a DataLoader; torch only honours it with worker processes."""
    try:
        workers = int(num_workers or 0)
    except (TypeError, ValueError):
        workers = 0
    return env_seconds(ENV_DATALOADER_TIMEOUT) if workers > 0 else 0.0


def harden_dataloader_kwargs(kwargs, skip=()) -> dict:
    """Copy of a `**kwargs` dict for DataLoader with timeout and pin_memory added unless given (or in `skip`)."""
    out = dict(kwargs)
    if "timeout" not in out and "timeout" not in skip:
        out["timeout"] = dataloader_timeout(out.get("num_workers", 0))
    if "pin_memory" not in out and "pin_memory" not in skip:
        out["pin_memory"] = True
    return out


# --- block swap -------------------------------------------------------------------------------------


def hard_exit(site: str, detail: str, hint: str) -> None:
    """Log what hung, dump every thread's stack to stderr, and end the process at once.

    os._exit because the stuck worker thread is non-daemon: a normal exit would join it and hang again.
    """
    msg = f"HANG GUARD [{site}]: {detail}. Try: {hint}"
    logger.error(msg)
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
    finally:
        os._exit(HANG_EXIT_CODE)


def wait_swap_future(future, block_idx, timeout=None):
    """`future.result()` bounded by FLUXTRAIN_BLOCK_SWAP_TIMEOUT; a swap that never finishes ends the process."""
    limit = env_seconds(ENV_BLOCK_SWAP_TIMEOUT) if timeout is None else float(timeout)
    if _injected("block_swap"):
        future = concurrent.futures.Future()  # never completes: exercises the guard below
    if limit <= 0:
        return future.result()
    try:
        return future.result(timeout=limit)
    except concurrent.futures.TimeoutError:  # not the builtin TimeoutError on Python 3.10
        # The future was already popped and the copy may still be running: the layout is undefined, so no retry.
        hard_exit(
            "block_swap",
            f"moving block {block_idx} between CPU and GPU did not finish within {limit:g}s",
            f"a lower --blocks_to_swap, more free RAM/VRAM, or a larger {ENV_BLOCK_SWAP_TIMEOUT}",
        )


# --- cache .npz I/O -----------------------------------------------------------------------------------


class CacheReadTimeout(TimeoutError):
    """A cache file read did not finish within FLUXTRAIN_CACHE_IO_TIMEOUT."""


class _InMemoryArchive:
    """Stands in for `NpzFile.zip`: `open(member)` gives that member's `.npy` bytes, rebuilt from memory.

    Newer upstream code reads an array's shape from the member header through `npz._files` and
    `npz.zip.open(...)` instead of loading it; this keeps that working on an already materialised read.
    """

    def __init__(self, arrays):
        self._arrays = arrays

    def namelist(self):
        return [f"{key}.npy" for key in self._arrays]

    def open(self, name, mode="r", *args, **kwargs):
        import io

        import numpy as np

        key = name[: -len(".npy")] if name.endswith(".npy") and name not in self._arrays else name
        if key not in self._arrays:
            raise KeyError(f"There is no item named {name!r} in the archive")
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asanyarray(self._arrays[key]), allow_pickle=True)
        buffer.seek(0)
        return buffer


class NpzArrays(dict):
    """All arrays of one `.npz`, already in memory; answers `in`, `[key]`, `.files`, `.close()`, `with`,
    and the `_files`/`zip` internals some upstream revisions use for header-only shape reads, like NpzFile."""

    @property
    def files(self):
        return list(self.keys())

    @property
    def _files(self):
        members = {key: f"{key}.npy" for key in self}
        members.update({name: name for name in members.values()})
        return members

    @property
    def zip(self):
        return _InMemoryArchive(self)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Alarm(BaseException):
    """Raised by the SIGALRM handler; BaseException so upstream `except Exception` cannot swallow it."""


def _read_npz(path, args, kwargs):
    import numpy as np

    if _injected("cache_io"):
        while True:
            time.sleep(0.05)
    loaded = np.load(path, *args, **kwargs)
    if not hasattr(loaded, "files"):
        return np.array(loaded)  # a plain .npy: copy so an mmap cannot fault later, outside the bound
    try:
        # Reading every key here is the point: NpzFile is lazy and the real I/O happens at npz[key].
        return NpzArrays((key, loaded[key]) for key in loaded.files)
    finally:
        loaded.close()


def _bounded_by_alarm(fn, limit):
    def on_alarm(signum, frame):
        raise _Alarm()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _bounded_by_thread(fn, limit):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name="fluxtrain-npz-read", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise _Alarm()  # the daemon thread stays blocked in I/O; it cannot keep the process alive
    if "error" in box:
        raise box["error"]
    return box["value"]


def _can_use_alarm() -> bool:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    return signal.getitimer(signal.ITIMER_REAL)[0] == 0  # never clobber somebody else's running timer


def bounded_npz_load(path, *args, **kwargs):
    """np.load(path) with every array read within FLUXTRAIN_CACHE_IO_TIMEOUT; CacheReadTimeout names the file."""
    limit = env_seconds(ENV_CACHE_IO_TIMEOUT)
    fn = lambda: _read_npz(path, args, kwargs)  # noqa: E731
    if limit <= 0:
        return fn()
    try:
        return _bounded_by_alarm(fn, limit) if _can_use_alarm() else _bounded_by_thread(fn, limit)
    except _Alarm:
        raise CacheReadTimeout(
            f"reading cache file {os.fspath(path)} did not finish within {limit:g}s ({ENV_CACHE_IO_TIMEOUT}). "
            "It may sit on a stalled network or cloud drive, or not be a regular file; delete it to re-cache, "
            f"or raise {ENV_CACHE_IO_TIMEOUT}."
        ) from None


def _atomic_write(saver, file, args, kwds):
    if hasattr(file, "write"):
        return saver(file, *args, **kwds)  # a file object: the caller owns atomicity
    path = os.fspath(file)
    if not path.endswith(".npz"):
        path += ".npz"  # numpy's own rule for names, kept so readers find the file
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            saver(handle, *args, **kwds)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # a kill mid-write leaves the old file or none, never a torn zip
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_savez(file, *args, **kwds):
    """np.savez written to a temp file in the same folder, then renamed over the final name."""
    import numpy as np

    _atomic_write(np.savez, file, args, kwds)


def atomic_savez_compressed(file, *args, **kwds):
    """np.savez_compressed, written atomically like atomic_savez."""
    import numpy as np

    _atomic_write(np.savez_compressed, file, args, kwds)


# --- accelerate state (resume) ------------------------------------------------------------------------


def _find_global_step(max_depth: int = 8):
    """The training loop's `global_step`, looked up in the callers' frames when the save site has no step."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        value = frame.f_locals.get("global_step")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        frame = frame.f_back
    return None


def _accum_steps(accelerator) -> int:
    try:
        return max(int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def save_state_at_step(accelerator, step, *args, **kwargs):
    """accelerator.save_state(...) with accelerate's `step` counter set from the global step for the save only.

    The saved counter is global_step x gradient_accumulation_steps, so it stays aligned to accumulation
    boundaries on resume; the live counter is restored afterwards so the running job is unaffected.
    """
    if step is None:
        step = _find_global_step()
    previous = getattr(accelerator, "step", None)
    if step is not None:
        try:
            accelerator.step = int(step) * _accum_steps(accelerator)
        except Exception as exc:  # never let bookkeeping break a save
            logger.warning("could not set accelerator.step before save_state: %s", exc)
    try:
        return accelerator.save_state(*args, **kwargs)
    finally:
        if step is not None and previous is not None:
            accelerator.step = previous


def _rng_pickle(accelerator, input_dir) -> str:
    index = getattr(accelerator, "process_index", 0) or 0
    return os.path.join(os.fspath(input_dir), f"random_states_{index}.pkl")


def _step_from_train_state(input_dir):
    try:
        with open(os.path.join(os.fspath(input_dir), "train_state.json"), encoding="utf-8") as handle:
            return int(json.load(handle)["current_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _restore_rng(states) -> list:
    import random

    import numpy as np
    import torch

    restored = []
    setters = [
        ("random_state", random.setstate),
        ("numpy_random_seed", np.random.set_state),
        ("torch_manual_seed", torch.set_rng_state),
    ]
    if torch.cuda.is_available():
        setters.append(("torch_cuda_manual_seed", torch.cuda.set_rng_state_all))
    for key, setter in setters:
        if key in states:
            try:
                setter(states[key])
                restored.append(key)
            except Exception as exc:
                logger.warning("could not restore %s from the checkpoint: %s", key, exc)
    return restored


def _fallback_after_step_error(accelerator, input_dir):
    path = _rng_pickle(accelerator, input_dir)
    states = {}
    try:
        import torch

        # weights_only=False: this is the user's own state folder, and the strict loader is what failed.
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        states = loaded if isinstance(loaded, dict) else {}
    except Exception as exc:
        logger.warning("RNG state %s cannot be read (%s); training resumes with fresh random state", path, exc)
    restored = _restore_rng(states) if states else []
    step = states.get("step")
    if step is None:
        from_json = _step_from_train_state(input_dir)
        step = from_json * _accum_steps(accelerator) if from_json is not None else 0
    accelerator.step = int(step)
    _load_custom_objects(accelerator, input_dir)
    logger.warning(
        "resume: %s has no usable 'step' (older accelerate); restored %s and set accelerator.step=%d",
        path, ", ".join(restored) or "no RNG state", accelerator.step,
    )


def _load_custom_objects(accelerator, input_dir):
    # Old accelerate raised before loading registered custom objects; sd-scripts registers none, others might.
    objects = getattr(accelerator, "_custom_objects", None) or []
    if not objects:
        return
    from accelerate.checkpointing import load_custom_state

    for index, obj in enumerate(objects):
        load_custom_state(obj, os.fspath(input_dir), index)


def load_state_with_fallback(accelerator, input_dir, *args, **kwargs):
    """accelerator.load_state(...) that survives the `KeyError: 'step'` of accelerate 0.32/0.33.

    Those versions assign the RNG pickle's `step` unconditionally, after models, optimizer and scheduler
    are already loaded; so on that exact error only the RNG state, the step counter and custom objects
    remain to be restored, which is done here from the pickle (or train_state.json for the step).
    """
    try:
        return accelerator.load_state(input_dir, *args, **kwargs)
    except KeyError as exc:
        if exc.args != ("step",):
            raise
    _fallback_after_step_error(accelerator, input_dir)
    return None
