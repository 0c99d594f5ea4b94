"""Process-side helpers for tools/training_monitor.py: output draining, the process tree, stall reports.

- `OutputDrain`: reads the child's merged stdout/stderr without ever stalling it (disk log + parser on the
  reader thread; console echo on a second thread behind a bounded, dropping queue).
- `LogTail`: the same parser feed for attach mode, from a train.log written by someone else.
- `ProcessTree`: every descendant of a root pid (psutil, never name matching); TERM -> grace -> KILL.
- `write_stall_report`: phase, step, last log lines, process tree, on-demand stack dump, GPU snapshot.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable

import psutil

logger = logging.getLogger("training_monitor")

_TAIL_BYTES = 256 * 1024


class _Tail:
    """The last ~256 KB of output, turned into what a terminal would show (last `\\r` segment per line)."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def add(self, chunk: bytes) -> None:
        with self._lock:
            self._chunks.append(chunk)
            self._size += len(chunk)
            while self._size > _TAIL_BYTES and len(self._chunks) > 1:
                self._size -= len(self._chunks.popleft())

    def lines(self, n: int = 200) -> list[str]:
        with self._lock:
            text = b"".join(self._chunks).decode("utf-8", "replace")
        shown = [ln.rstrip("\r").split("\r")[-1] for ln in text.split("\n")]
        return [ln for ln in shown if ln.strip()][-n:]


class OutputDrain:
    """Reader thread for a pipe: file + parser always, console echo best effort (drops when it lags)."""

    def __init__(self, pipe: BinaryIO, log_path: Path, feed: Callable[[bytes], None], echo: BinaryIO | None):
        self.tail = _Tail()
        self.dropped = 0
        self._pipe, self._feed, self._echo = pipe, feed, echo
        self._log = open(log_path, "ab")
        self._queue: queue.Queue = queue.Queue(maxsize=512)
        self._reader = threading.Thread(target=self._read, name="monitor-drain", daemon=True)
        self._reader.start()
        if echo is not None:
            threading.Thread(target=self._write_console, name="monitor-echo", daemon=True).start()

    def set_feed(self, feed: Callable[[bytes], None]) -> None:
        self._feed = feed

    def _read(self) -> None:
        fd = self._pipe.fileno()
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                self._write_log(chunk)
                self.tail.add(chunk)
                try:
                    self._feed(chunk)
                except Exception:  # a parser bug must never stop the draining
                    logger.exception("progress parser failed on a chunk of output")
                if self._echo is not None:
                    try:
                        self._queue.put_nowait(chunk)
                    except queue.Full:
                        self.dropped += len(chunk)  # the console lags; the file has everything
        except OSError as exc:
            logger.warning("reading the training output stopped: %s", exc)
        finally:
            if self._log is not None:
                try:
                    self._log.close()
                except OSError:
                    pass
            if self._echo is not None:
                try:
                    self._queue.put_nowait(None)  # ends the console thread; if it lags, it is a daemon anyway
                except queue.Full:
                    pass

    def _write_log(self, chunk: bytes) -> None:
        if self._log is None:
            return
        try:
            self._log.write(chunk)
        except OSError as exc:  # disk full: keep draining (a full pipe would freeze the trainer), stop logging
            logger.error("cannot write train.log any more (%s); the trainer's output is no longer saved", exc)
            self._log = None

    def _write_console(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            try:
                self._echo.write(chunk)
                self._echo.flush()
            except (OSError, ValueError):
                return

    def join(self, timeout: float) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()


class LogTail:
    """Attach mode: feed the bytes appended to an existing train.log since the last poll."""

    def __init__(self, path: Path, feed: Callable[[bytes], None]):
        self.path, self._feed, self.tail = path, feed, _Tail()
        try:
            self._pos = path.stat().st_size
        except OSError:
            self._pos = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                chunk = fh.read(8 << 20)
        except OSError:
            return
        if chunk:
            self._pos += len(chunk)
            self.tail.add(chunk)
            self._feed(chunk)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessTree:
    """The root and all its descendants, remembered so that orphans are still found after their parent dies."""

    def __init__(self, root_pid: int, *, own_group: bool):
        self.root_pid, self.own_group = root_pid, own_group
        self.known: dict[int, psutil.Process] = {}
        self.refresh()

    def refresh(self) -> None:
        roots = [p for p in self.known.values() if _alive(p)]
        if self.root_pid not in self.known:
            try:
                roots.append(psutil.Process(self.root_pid))
            except psutil.Error:
                pass
        for p in roots:
            self.known.setdefault(p.pid, p)
            try:
                for c in p.children(recursive=True):
                    self.known.setdefault(c.pid, c)
            except psutil.Error:
                continue

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.known.values() if _alive(p)]

    def root_stopped(self) -> bool:
        p = self.known.get(self.root_pid)
        try:
            return p is not None and p.status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False

    def describe(self) -> list[str]:
        lines = []
        for p in sorted(self.alive(), key=lambda q: q.pid):
            try:
                with p.oneshot():
                    cpu = p.cpu_times()
                    lines.append(
                        f"pid {p.pid} ppid {p.ppid()} status {p.status()} rss {p.memory_info().rss >> 20} MiB "
                        f"cpu {cpu.user + cpu.system:.1f} s: {' '.join(p.cmdline()).replace(chr(10), ' ')[:300]}"
                    )
            except psutil.Error as exc:
                lines.append(f"pid {p.pid}: {exc.__class__.__name__}")
        return lines or ["(no live processes)"]

    def _signal_all(self, kill: bool) -> None:
        killpg = getattr(os, "killpg", None)  # POSIX only; on Windows the psutil walk below does the work
        if self.own_group and killpg is not None:
            try:
                killpg(self.root_pid, signal.SIGKILL if kill else signal.SIGTERM)
            except OSError:
                pass  # group already empty
        cont = getattr(signal, "SIGCONT", None)
        for p in self.alive():
            try:
                p.kill() if kill else p.terminate()
                if cont is not None and not kill:
                    p.send_signal(cont)  # a stopped (SIGSTOP) process only acts on TERM once continued
            except psutil.Error:
                pass

    def terminate(self, grace: float) -> list[int]:
        """TERM everything, wait up to `grace` s (picking up late children), KILL the rest; pids still alive."""
        self.refresh()
        if not self.alive():
            return []
        self._signal_all(kill=False)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            self.refresh()
            if not self.alive():
                return []
            time.sleep(0.05)
        self._signal_all(kill=True)
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            self.refresh()
            if not self.alive():
                return []
            time.sleep(0.05)
        return [p.pid for p in self.alive()]


def request_stack_dump(pid: int, output_dir: Path, wait: float) -> str:
    """SIGUSR1 -> our trainer writes stacks-<ts>.txt (via a hidden .stacks-dump-<pid>.txt). Returns text or a note."""
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None:
        return "(no SIGUSR1 on this platform)"
    before = {p.name for p in output_dir.glob("stacks-*.txt")}
    sent = time.time()
    try:
        os.kill(pid, sig)
    except OSError as exc:
        return f"(could not signal pid {pid}: {exc})"
    hidden = output_dir / f".stacks-dump-{pid}.txt"
    end = time.monotonic() + wait
    while time.monotonic() < end:
        time.sleep(0.1)
        for p in sorted(output_dir.glob("stacks-*.txt")):
            try:
                if p.name not in before or p.stat().st_mtime >= sent - 0.5:
                    text = p.read_text(errors="replace")
                    if text.strip():
                        return f"[{p.name}]\n{text[:200_000]}"
            except OSError:
                continue
        try:
            if hidden.stat().st_size > 0 and hidden.stat().st_mtime >= sent - 0.5:
                time.sleep(0.2)  # let faulthandler finish the dump
                return f"[{hidden.name}]\n{hidden.read_text(errors='replace')[:200_000]}"
        except OSError:
            pass
    return f"(no stack dump appeared within {wait:g} s of SIGUSR1)"


def py_spy_dump(pids: list[int], timeout: float = 10.0) -> str:
    """Stacks of a trainer that cannot dump its own (upstream sd-scripts), when py-spy is installed."""
    exe = shutil.which("py-spy")
    if exe is None or not pids:
        return ""
    out = []
    for pid in sorted(pids)[:4]:
        try:
            res = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout)
            out.append(f"[py-spy dump --pid {pid}]\n{res.stdout.strip() or res.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(f"[py-spy dump --pid {pid}] failed: {exc}")
    return "\n\n".join(out)


def gpu_snapshot(timeout: float = 10.0) -> str:
    """Secondary information only: nvidia-smi's view, when the tool exists."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "(nvidia-smi not found; no GPU snapshot)"
    out = []
    for query in (
        ["--query-gpu=index,utilization.gpu,memory.used,memory.total,power.draw,clocks.sm", "--format=csv"],
        ["--query-compute-apps=pid,used_memory", "--format=csv"],
    ):
        try:
            res = subprocess.run([exe, *query], capture_output=True, text=True, timeout=timeout)
            out.append(res.stdout.strip() or res.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(f"(nvidia-smi failed: {exc})")
    return "\n".join(out)


def write_stall_report(output_dir: Path, *, summary: list[str], tree: list[str], stacks: str, log_lines: list[str],
                       gpu: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"stall-{stamp}.txt"
    n = 1
    while path.exists():
        n += 1
        path = output_dir / f"stall-{stamp}-{n}.txt"
    parts = [
        "# Training stall report (tools/training_monitor.py)", *summary, "",
        "## Process tree", *tree, "",
        "## Python stacks (SIGUSR1)", stacks, "",
        "## GPU", gpu, "",
        f"## Last {len(log_lines)} log lines", *log_lines, "",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
