"""Hang guards: turn "stuck forever" into "exit 124 with a message, a stack dump and a heartbeat".

Responsibilities:
- `deadline(site, seconds)`: a bound around one blocking operation, enforced by ONE shared daemon
  watchdog thread and a deadline table (entering/leaving costs about a microsecond);
- `fire()`: print `HANG GUARD [site]: ...` with the site's hint (library.hang_sites), dump all
  thread stacks to `OUTPUT_DIR/hang-<ts>.txt`, mark the heartbeat failed and `os._exit(124)` (a
  stuck non-daemon thread cannot keep us alive);
- stall diagnosis: `progress()` re-arms faulthandler's C-level timer (dump only, never kills);
- SIGUSR1 (where it exists): dump all stacks to `OUTPUT_DIR/stacks-<ts>.txt` on demand.
"""
from __future__ import annotations

import contextlib
import faulthandler
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

from library import console_markers
from library.hang_sites import hint_for

logger = logging.getLogger(__name__)

EXIT_HANG = 124  # same code as coreutils `timeout`, so scripts can tell a hang from a crash
_POLL_S = 1.0  # the watchdog wakes at least this often to pick up faulthandler dumps

_RESUME_NOTE = "Checkpoints already written are complete; continue later with --resume auto."


def is_dataloader_timeout(exc: BaseException) -> bool:
    """True for torch's own DataLoader timeout (a plain RuntimeError, not TimeoutError)."""
    return isinstance(exc, RuntimeError) and "DataLoader timed out after" in str(exc)


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _unique_path(directory: Path, prefix: str) -> Path:
    """`<prefix>-<ts>.txt`, with a counter when a file of that second exists already."""
    ts = _timestamp()
    path = directory / f"{prefix}-{ts}.txt"
    for n in itertools.count(2):
        if not path.exists():
            return path
        path = directory / f"{prefix}-{ts}-{n}.txt"
    raise AssertionError("unreachable")


class _Deadline:
    """One armed bound; `detail` may be updated inside the block (e.g. the file being read)."""

    __slots__ = ("_guards", "site", "seconds", "hint", "detail", "expires", "_token")

    def __init__(self, guards: "HangGuards", site: str, seconds: float, hint: str | None, detail: str | None):
        self._guards = guards
        self.site = site
        self.seconds = seconds
        self.hint = hint
        self.detail = detail
        self.expires = 0.0
        self._token = 0

    def __enter__(self) -> "_Deadline":
        self.expires = time.monotonic() + self.seconds
        self._token = self._guards._arm(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._guards._disarm(self._token)


class _Unbounded:
    """What `with deadline(...) as d` yields when the bound is disabled."""

    detail: str | None = None


class HangGuards:
    """Deadlines, stall dumps and on-demand stack dumps for one training process.

    `position()` returns at least `{"phase", "epoch", "step"}` for the messages; when it is None
    or fails, the heartbeat's last state is used. `exit_func` exists for in-process tests only.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        heartbeat: Any | None,
        *,
        stall_dump_timeout: float | None,
        position: Callable[[], dict] | None = None,
        exit_func: Callable[[int], Any] = os._exit,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat = heartbeat
        self.stall_dump_timeout = float(stall_dump_timeout or 0)
        self._position = position
        self._exit = exit_func
        self._cond = threading.Condition(threading.Lock())
        self._table: dict[int, _Deadline] = {}
        self._tokens = itertools.count(1)
        self._wake_at = float("inf")  # when the watchdog plans to wake; arm() notifies only if earlier
        self._closed = False
        self._fire_lock = threading.Lock()  # taken once and never released: only one fire() runs
        self._pid = os.getpid()
        self._armed_at = -1e18
        self._armed_wall = 0.0  # wall-clock time of the last arming, compared with a dump file's mtime
        self._dump_lock = threading.Lock()  # progress() (main thread) vs the watchdog swapping files
        self._drop_dead_pending_files()
        self._stall_file = self._open_pending("stall")
        self._signal_file = self._open_pending("stacks")
        self._register_sigusr1(self._signal_file)
        self._thread = threading.Thread(target=self._watch, name="hang-guard-watchdog", daemon=True)
        self._thread.start()

    # -- deadlines -----------------------------------------------------------------------------
    def deadline(self, site: str, seconds: float | None, *, hint: str | None = None,
                 detail: str | None = None) -> contextlib.AbstractContextManager:
        """Bound the `with` block to `seconds` (0/None: no bound). On expiry fire(site, ...)."""
        if not seconds or seconds <= 0 or self._closed:
            return contextlib.nullcontext(_Unbounded())  # `as d: d.detail = ...` works either way
        return _Deadline(self, site, float(seconds), hint, detail)

    def guard_iterator(self, iterable: Iterable, *, site: str = "dataloader", seconds: float | None,
                       map_errors: tuple[tuple[type[BaseException], str], ...] = ()) -> Iterator:
        """Yield from `iterable` with iter() and every next() under a deadline.

        torch's own DataLoader timeout (RuntimeError) fires as `site`; `map_errors` maps other
        exception types to sites, e.g. `((CacheReadTimeout, "cache_io"),)` for a bounded cache
        read that timed out inside a worker and was re-raised here.
        """
        with self.deadline(site, seconds, detail="starting the data loader"):
            it = iter(iterable)  # worker start-up is not covered by DataLoader(timeout=...)
        while True:
            try:
                with self.deadline(site, seconds, detail="waiting for the next batch"):
                    item = next(it)
            except StopIteration:
                return
            except Exception as e:
                if is_dataloader_timeout(e):
                    self.fire_from_exception(site, e)
                for exc_type, exc_site in map_errors:
                    if isinstance(e, exc_type):
                        self.fire_from_exception(exc_site, e)
                raise
            yield item  # outside the deadline: the caller's step time is not the loader's

    def _arm(self, d: _Deadline) -> int:
        with self._cond:
            token = next(self._tokens)
            self._table[token] = d
            if d.expires < self._wake_at:
                self._cond.notify()
        return token

    def _disarm(self, token: int) -> None:
        with self._cond:
            self._table.pop(token, None)  # the watchdog just finds nothing due on its next wake

    def _watch(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [d for d in self._table.values() if d.expires <= now]
                nxt = min((d.expires for d in self._table.values()), default=float("inf"))
                self._wake_at = min(nxt, now + _POLL_S)
                if not due:
                    self._cond.wait(max(0.0, self._wake_at - now))
            if due:
                d = min(due, key=lambda x: x.expires)
                what = d.detail or f"{d.site} did not finish"
                try:
                    self.fire(d.site, f"{what} within {d.seconds:g} s", d.hint)
                except SystemExit:  # only with a test's exit_func: the watchdog's job is over
                    return
            self._collect_pending_dumps()

    # -- firing --------------------------------------------------------------------------------
    def position(self) -> dict:
        pos: dict = {}
        if self.heartbeat is not None:
            with contextlib.suppress(Exception):
                pos.update(self.heartbeat.snapshot())
        if self._position is not None:
            try:
                pos.update(self._position() or {})
            except Exception as e:  # a broken callback must not stop the exit path
                logger.debug("position callback failed: %s", e)
        return pos

    def fire(self, site: str, detail: str, hint: str | None = None) -> NoReturn:
        """Report a hang at `site` and end the process with exit code 124. Never returns."""
        self._fire_lock.acquire()  # a second caller waits here until the first has exited
        # Last resort: if writing the dump or the heartbeat blocks (dead disk, full stderr pipe), still exit.
        threading.Thread(target=self._exit_after, args=(15.0,), name="hang-guard-exit", daemon=True).start()
        with contextlib.suppress(Exception):
            faulthandler.cancel_dump_traceback_later()
        pos = self.position()
        line = (f"{console_markers.HANG_GUARD.format(site=site, detail=detail)} (phase {pos.get('phase', '?')}, "
                f"epoch {pos.get('epoch', '?')}, step {pos.get('step', '?')}). Try: {hint or hint_for(site)}")
        dump = self._write_hang_file(line)
        where = f"All thread stacks: {dump}." if dump else "The stack dump could not be written."
        with contextlib.suppress(Exception):
            sys.stderr.write(f"\n{line}\n{where} {_RESUME_NOTE}\n")
        if self.heartbeat is not None:
            with contextlib.suppress(Exception):
                self.heartbeat.failed(line)
        if self._exit is os._exit:  # not when a test replaced the exit: it would kill the test's children
            _kill_worker_processes()
        self._drop_empty_pending_files()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._exit(EXIT_HANG)
        raise SystemExit(EXIT_HANG)  # only reached when a test replaced exit_func

    def _exit_after(self, seconds: float) -> None:
        time.sleep(seconds)
        self._exit(EXIT_HANG)

    def fire_from_exception(self, site: str, exc: BaseException, hint: str | None = None) -> NoReturn:
        """Same exit path for a timeout that surfaced as an exception (DataLoader's RuntimeError)."""
        self.fire(site, f"{type(exc).__name__}: {exc}", hint)

    def _write_hang_file(self, line: str) -> Path | None:
        try:
            path = _unique_path(self.output_dir, "hang")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{line}\npid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)  # needs a real fd, not a StringIO
            return path
        except Exception as e:
            logger.error("could not write the hang stack dump: %s", e)
            return None

    # -- stall and on-demand dumps -------------------------------------------------------------
    def progress(self) -> None:
        """Call after every step and phase change: re-arms the 'no progress in N s' stack dump."""
        # FIX: a stall nothing can interrupt (a stuck kernel) used to leave no trace; now all thread stacks
        # land in OUTPUT_DIR/hang-<time>.txt after --stall_dump_timeout without progress.
        if self.stall_dump_timeout <= 0 or self._closed:
            return
        now = time.monotonic()
        # Re-arming starts a new C thread (~40 us); at most every 1% of the timeout keeps that off the step time.
        if now - self._armed_at < min(1.0, self.stall_dump_timeout / 100):
            return
        with self._dump_lock:
            if self._stall_file is not None:
                faulthandler.dump_traceback_later(self.stall_dump_timeout, repeat=False, file=self._stall_file)
                self._armed_at = now
                self._armed_wall = time.time()

    def _open_pending(self, kind: str):
        # faulthandler writes from C (no GIL) to an fd opened in advance, so the dump goes to a hidden
        # file first; the watchdog renames it to hang-/stacks-<ts>.txt once it has content.
        try:
            return open(self.output_dir / f".{kind}-dump-{os.getpid()}.txt", "w+", encoding="utf-8")
        except OSError as e:
            logger.warning("stack dumps disabled: cannot write in %s: %s", self.output_dir, e)
            return None

    def _drop_dead_pending_files(self) -> None:
        """Hidden dump files of a process that is gone (killed, so it never tidied up): a dump it wrote is
        published under its public name, an empty file is removed."""
        from library.atomic_io import pid_alive

        for kind, prefix in (("stall", "hang"), ("stacks", "stacks")):
            for hidden in self.output_dir.glob(f".{kind}-dump-*.txt"):
                pid = hidden.name[len(kind) + 7:-4]  # ".<kind>-dump-" ... ".txt"
                if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                    continue
                with contextlib.suppress(OSError):
                    if hidden.stat().st_size:
                        os.replace(hidden, _unique_path(self.output_dir, prefix))
                    else:
                        hidden.unlink()

    def _drop_empty_pending_files(self) -> None:
        for kind in ("stall", "stacks"):
            hidden = self.output_dir / f".{kind}-dump-{os.getpid()}.txt"
            with contextlib.suppress(OSError):
                if hidden.stat().st_size == 0:
                    hidden.unlink()

    def _register_sigusr1(self, f) -> None:
        sig = getattr(signal, "SIGUSR1", None)
        if sig is None or f is None:
            return  # Windows: no SIGUSR1; the stall dump still works
        try:
            faulthandler.register(sig, file=f, all_threads=True, chain=False)
        except (RuntimeError, ValueError, OSError) as e:
            logger.debug("SIGUSR1 stack dump not available: %s", e)

    def _collect_pending_dumps(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child inherited the thread state; the files belong to the parent
        with self._dump_lock:
            self._stall_file = self._publish(self._stall_file, "stall", "hang", stall=True)
            self._signal_file = self._publish(self._signal_file, "stacks", "stacks", stall=False)

    def _publish(self, f, kind: str, prefix: str, *, stall: bool):
        """Rename a hidden dump file that faulthandler wrote into to its public name; reopen."""
        if f is None:
            return None
        try:
            stat = os.fstat(f.fileno())
            if stat.st_size == 0:
                return f
            dumped_at = stat.st_mtime
            time.sleep(0.05)  # let faulthandler finish writing before the rename
            f.close()
            path = _unique_path(self.output_dir, prefix)
            os.replace(self.output_dir / f".{kind}-dump-{os.getpid()}.txt", path)
        except OSError as e:
            logger.warning("could not publish stack dump: %s", e)
            return f
        if stall:
            sys.stderr.write(f"\n{console_markers.STALL_DUMP.format(seconds=self.stall_dump_timeout)}; all thread "
                             f"stacks written to {path} (diagnosis only, the run goes on).\n")
        new = self._open_pending(kind)
        if not stall:
            self._register_sigusr1(new)
        elif new is not None and not self._closed and self._armed_wall >= dumped_at:
            # progress() re-armed the timer after this dump, with the file just closed: re-arm with the new
            # file so a stall that starts now still gets its dump. (No progress since: one dump is enough.)
            faulthandler.dump_traceback_later(self.stall_dump_timeout, repeat=False, file=new)
            self._armed_at = time.monotonic()
        return new

    def close(self) -> None:
        """Stop the watchdog and the stall timer; publish dumps that were written; drop empty files."""
        with self._cond:
            self._closed = True
            self._table.clear()
            self._cond.notify()
        with contextlib.suppress(Exception):
            faulthandler.cancel_dump_traceback_later()
        if hasattr(signal, "SIGUSR1"):
            with contextlib.suppress(Exception):
                faulthandler.unregister(signal.SIGUSR1)
        self._thread.join(timeout=5)
        with self._dump_lock:
            self._finish_pending_files()

    def _finish_pending_files(self) -> None:
        for kind, prefix, f in (("stall", "hang", self._stall_file), ("stacks", "stacks", self._signal_file)):
            if f is None:
                continue
            hidden = self.output_dir / f".{kind}-dump-{os.getpid()}.txt"
            with contextlib.suppress(OSError):
                size = os.fstat(f.fileno()).st_size
                f.close()
                if size:
                    os.replace(hidden, _unique_path(self.output_dir, prefix))
                else:
                    hidden.unlink()
        self._stall_file = self._signal_file = None

    def __enter__(self) -> "HangGuards":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_worker_processes() -> None:
    """Kill our own multiprocessing children (DataLoader workers); the caller os._exit()s next.

    os._exit skips the atexit hooks that normally stop them, and a worker stuck in a read never
    checks whether its parent is alive: it would linger and keep the parent's pipes open. torch's
    SIGCHLD handler raises in the main thread when a worker dies; that must not win the race
    against our exit code, so it is reset (main thread) or starved of the GIL (watchdog thread).
    """
    with contextlib.suppress(Exception):
        children = multiprocessing.active_children()
        if not children:
            return
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        else:
            sys.setswitchinterval(60.0)  # keep the GIL here until os._exit, a few lines later
        for p in children:
            with contextlib.suppress(Exception):
                p.kill()
