"""Stopping the run on SIGINT/SIGTERM, or when its launcher dies, so that no process of the run trains on.

- `install()` (main thread, once): a signal sets a stop request; the main thread ends the run at the next safe
  point (`check()`: every phase change and after every step) by raising `RunStopped` (exit 130 / 143).
- Launchers: accelerate's one-process launcher neither forwards signals nor takes its child with it when it dies,
  and torch's launcher starts every worker in its own session (`kill -9` of its group misses them). A trainer
  started by one of them asks Linux for SIGTERM when its parent dies (PR_SET_PDEATHSIG) and a watch thread also
  checks the parent every second (the portable fallback).
- Backstop: when no safe point comes within `grace` seconds (loading, caching, sampling, a collective whose peer
  is gone), the watch thread marks the heartbeat `stopped` and ends the process itself. Every checkpoint write
  is atomic, so that is as safe as the clean path. A second signal ends the process at once.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from library import errors
from library.output_lock import is_global_main_process

STOP_GRACE_S = 5.0
_WATCH_INTERVAL_S = 1.0
_HARD_EXIT_LIMIT_S = 10.0  # the exit path itself (heartbeat write on a dead disk) may not block longer
_PR_SET_PDEATHSIG = 1
# What a trainer's parent looks like when it is a launcher (checked on the parent's own command line).
_LAUNCHER_PROGRAMS = {"accelerate", "accelerate-launch", "torchrun"}
_LAUNCHER_MODULES = {"accelerate.commands.launch", "accelerate.commands.accelerate_cli", "torch.distributed.run",
                     "torch.distributed.launch"}
# Where the parent's command line cannot be read (Windows, macOS): the environment the launchers set.
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")


class RunStopped(BaseException):
    """Raised in the main thread at a safe point after a stop request.

    A BaseException, like KeyboardInterrupt, so `except Exception` cleanup never swallows it.
    """

    def __init__(self, signum: int, detail: str, *, exit_code: int | None = None):
        super().__init__(f"{signal_name(signum)}: {detail}")
        self.signum = signum
        self.signal_name = signal_name(signum)
        self.detail = detail
        self._exit_code = exit_code

    @property
    def exit_code(self) -> int:
        """130 for SIGINT (and Ctrl-Break), 143 for SIGTERM, 128+N for another signal."""
        if self._exit_code is not None:
            return self._exit_code
        if self.signum == signal.SIGINT or self.signum == getattr(signal, "SIGBREAK", None):
            return errors.EXIT_INTERRUPTED
        if self.signum == signal.SIGTERM:
            return errors.EXIT_TERMINATED
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---------------------------------------------------------------------------------------------- launchers
def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def looks_like_launcher(cmdline: list[str]) -> bool:
    """`accelerate launch`, `torchrun`, `python -m torch.distributed.run` and friends (first words only)."""
    for arg in cmdline[:3]:
        name = os.path.basename(arg)
        if name.lower().removesuffix(".exe") in _LAUNCHER_PROGRAMS or arg in _LAUNCHER_MODULES:
            return True
    return False


def launcher_parent() -> int | None:
    """The parent's pid when the parent is a launcher, else None.

    A shell or a supervisor is no launcher: `nohup python flux_train_network.py &` must train on after its
    shell exits, so the parent-death rules apply only below a launcher.
    """
    ppid = os.getppid()
    if ppid <= 1:
        return None
    cmdline = _cmdline(ppid)
    if cmdline is not None:
        return ppid if looks_like_launcher(cmdline) else None
    return ppid if any(k in os.environ for k in _LAUNCHER_ENV) else None


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: have the kernel send `sig` to us when our parent exits, however it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_status_of_zombie(pid: int, *, tries: int = 5) -> str | None:
    """How a dead, not yet reaped process ended ("SIGINT", "exit code 1"), from /proc on Linux; else None."""
    for attempt in range(tries):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None  # reaped already (or no /proc)
        if fields and fields[0] in ("Z", "X"):
            break
        time.sleep(0.02)  # our death signal can arrive a moment before the parent is marked a zombie
    else:
        return None
    if len(fields) < 50:
        return None
    status = int(fields[49])  # field 52: the exit status as waitpid reports it
    if os.WIFSIGNALED(status):
        return signal_name(os.WTERMSIG(status))
    return f"exit code {os.WEXITSTATUS(status)}"


class _ParentWatch:
    """Is the launcher still there? getppid() on POSIX; a process handle on Windows (pid reuse safe)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._handle = None
        if os.name == "nt":
            import ctypes

            synchronize = 0x00100000
            self._handle = ctypes.windll.kernel32.OpenProcess(synchronize, False, pid) or None

    def gone(self) -> bool:
        if os.name == "nt":
            if self._handle is None:
                return False
            import ctypes

            return ctypes.windll.kernel32.WaitForSingleObject(self._handle, 0) == 0  # WAIT_OBJECT_0
        return os.getppid() != self.pid


# ---------------------------------------------------------------------------------------------- the controller
class RunStop:
    """Signal handlers, the launcher watch and the backstop of one trainer process (see module docstring)."""

    def __init__(self, output_dir: str | os.PathLike | None, *, grace: float = STOP_GRACE_S,
                 is_main: bool | None = None):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.grace = float(grace)
        self.is_main = is_global_main_process() if is_main is None else is_main
        self.request: RunStopped | None = None
        self.requested_at = 0.0
        self._announced = False
        self._signals_seen = 0
        self._heartbeat: Any = None
        self._parent: _ParentWatch | None = None
        self._previous: dict[int, Any] = {}
        self._wake_r = self._wake_w = None
        self._previous_wakeup_fd = -1
        self._closed = threading.Event()
        self._exit_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- set-up ----------------------------------------------------------------------------------------
    def install(self) -> "RunStop":
        for sig in self._signals():
            current = signal.getsignal(sig)
            if current == signal.SIG_IGN:
                continue  # started with it ignored (nohup, a background job): keep that choice
            self._previous[sig] = current
            signal.signal(sig, self._on_signal)
        try:
            # The C-level handler writes the signal number here even while the main thread is stuck in C code
            # and cannot run the Python handler: the watch thread then still starts the backstop.
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        except (OSError, ValueError):
            self._wake_r = self._wake_w = None  # the Python handler counts the signals instead
        launcher = launcher_parent()
        if launcher is not None:
            _set_parent_death_signal(signal.SIGTERM)
            self._parent = _ParentWatch(launcher)
            if self._parent.gone():  # it died before the death signal was armed
                self._launcher_died()
        self._thread = threading.Thread(target=self._watch, name="run-stop-watch", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _signals() -> list[int]:
        sigs = [signal.SIGINT]
        if os.name == "nt":
            sigs.append(signal.SIGBREAK)  # Ctrl-Break; SIGTERM cannot be caught on Windows
        else:
            sigs.append(signal.SIGTERM)
        return sigs

    def attach_heartbeat(self, heartbeat: Any) -> None:
        """The heartbeat to mark `stopped`; before one is attached, the main rank writes a fresh one."""
        self._heartbeat = heartbeat

    def close(self) -> None:
        """Restore the handlers (in-process callers). A stop in progress keeps its backstop running."""
        if self._wake_w is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._previous_wakeup_fd)
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()
        if self._parent is not None:
            _set_parent_death_signal(0)
        if self.request is None:
            self._closed.set()

    def __enter__(self) -> "RunStop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------------
    def check(self) -> None:
        """A safe point: raise RunStopped when a stop was requested."""
        if self.request is not None:
            raise self.request

    def _on_signal(self, signum: int, frame: object) -> None:
        # Runs in the main thread between two bytecodes: no locks, no printing (the watch thread reports).
        if self._wake_r is None:  # no watch-thread counting: count here
            self._count_signal(signum)
        if self.request is None:
            self._request_stop(signum, "stop requested")

    def _count_signal(self, signum: int) -> None:
        """Every signal passes here once (the watch thread reads them from the wakeup socket); a second one
        ends the process at once, unless it is our parent-death SIGTERM following a stop that reached us too."""
        self._signals_seen += 1
        if self._signals_seen == 1:
            if self.request is None:
                self._request_stop(signum, "stop requested")  # the main thread may be stuck in C code
            return
        if signum == signal.SIGTERM and self._parent is not None and self._parent_ending():
            return
        threading.Thread(target=self.hard_exit, args=("a second signal",), daemon=True).start()

    def _request_stop(self, signum: int, detail: str) -> None:
        if self.request is None:
            self.requested_at = time.monotonic()
            if self._parent is not None and signum == signal.SIGTERM and self._parent_ending():
                return self._launcher_died()
            self.request = RunStopped(signum, detail)

    def _parent_ending(self, wait: float = 0.5) -> bool:
        """Is this SIGTERM our parent-death signal? It fires when the launcher thread that started us exits,
        which can be a moment before the launcher's other threads are gone and we are re-parented."""
        deadline = time.monotonic() + wait
        while not self._parent.gone():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _launcher_died(self) -> None:
        pid = self._parent.pid
        how = exit_status_of_zombie(pid)
        signum = signal.SIGTERM
        if how and how.startswith("SIG"):
            with contextlib.suppress(AttributeError):
                signum = getattr(signal, how)
        ended = f"ended ({how})" if how else "ended"
        self.requested_at = self.requested_at or time.monotonic()
        # The heartbeat names the launcher's signal; the exit code says interrupted (130) or terminated (143),
        # never 137, which supervisors read as "killed for memory".
        code = errors.EXIT_INTERRUPTED if signum == signal.SIGINT else errors.EXIT_TERMINATED
        self.request = RunStopped(signum, f"the launcher (pid {pid}) {ended}, so this trainer stops too",
                                  exit_code=code)

    # -- the watch thread ------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closed.is_set():
            for signum in self._wait_for_signals(_WATCH_INTERVAL_S):
                self._count_signal(signum)
            if self.request is None and self._parent is not None and self._parent.gone():
                self._launcher_died()
            if self.request is None:
                continue
            if not self._announced:
                self._announced = True
                self._say(f"\n{self.request}: stopping at the next safe point (at most {self.grace:g} s); "
                          "completed checkpoints stay valid. Send the signal again to stop at once.\n")
            if time.monotonic() - self.requested_at >= self.grace:
                self.hard_exit(f"no safe point within {self.grace:g} s")

    def _wait_for_signals(self, timeout: float) -> list[int]:
        if self._wake_r is None:
            self._closed.wait(timeout)
            return []
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
            if ready:
                return [b for b in self._wake_r.recv(64) if b in self._previous]
        except (OSError, ValueError):
            self._closed.wait(timeout)
        return []

    # -- ending ----------------------------------------------------------------------------------------
    def mark_heartbeat(self) -> None:
        """Mark the heartbeat `stopped` with the signal (the trainer's clean path calls this too)."""
        req = self.request
        if req is None:
            return
        hb = self._heartbeat
        if hb is None and self.is_main and self.output_dir is not None:
            from library.heartbeat import Heartbeat

            hb = self._heartbeat = Heartbeat(self.output_dir)
        if hb is not None:
            with contextlib.suppress(Exception):
                hb.stopped(req.signal_name, req.detail)

    def hard_exit(self, why: str) -> None:
        """End the process now: heartbeat `stopped`, DataLoader workers killed, exit 130/143. Never returns."""
        if not self._exit_lock.acquire(blocking=False):
            return  # another thread is already exiting
        req = self.request or RunStopped(signal.SIGTERM, "stop requested")
        self.request = req
        threading.Thread(target=self._exit_after, args=(_HARD_EXIT_LIMIT_S, req.exit_code), daemon=True).start()
        self.mark_heartbeat()
        self._say(f"\nstopped ({req}; {why}): exiting now. Completed checkpoints are valid; "
                  "continue with --resume auto.\n")
        from library.hang_guards import _kill_worker_processes

        _kill_worker_processes()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(req.exit_code)

    @staticmethod
    def _exit_after(seconds: float, code: int) -> None:
        time.sleep(seconds)
        os._exit(code)

    @staticmethod
    def _say(text: str) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.write(text)
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------- module API
_active: RunStop | None = None


def install(output_dir: str | os.PathLike | None, *, grace: float = STOP_GRACE_S) -> RunStop:
    """Install the stop handling for this process (main thread); `close()` or `with` removes it again."""
    global _active
    if _active is not None:
        _active.close()
    _active = RunStop(output_dir, grace=grace).install()
    return _active


def check() -> None:
    """Safe point: raise RunStopped when a stop was requested (no-op without `install`)."""
    if _active is not None and _active.request is not None:
        raise _active.request


def requested() -> RunStopped | None:
    """The pending stop, if any (an error raised while stopping, e.g. a collective whose peer left, is a stop)."""
    return _active.request if _active is not None else None


def attach_heartbeat(heartbeat: Any) -> None:
    if _active is not None:
        _active.attach_heartbeat(heartbeat)


def exit_process(code: int) -> NoReturn:
    """End the entry script. After a stop, skip the interpreter's teardown: with torch loaded it took seconds
    (measured 5-6 s on a loaded 2-core machine), and no watch thread survives into it to bound it."""
    if requested() is None:
        sys.exit(code)
    from library.hang_guards import _kill_worker_processes

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _kill_worker_processes()
    os._exit(code)


def _after_fork_in_child() -> None:
    # A forked DataLoader worker must not share our wakeup socket nor treat SIGTERM as a polite request.
    global _active
    if _active is None:
        return
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig, handler in _active._previous.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(sig, handler)
    _active = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
