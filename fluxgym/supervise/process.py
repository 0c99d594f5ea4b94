"""Our own training process tree: launch it, recognise it, end it for good.

- `launch`: start a command in its own session/process group so the whole tree can be signalled.
- `ProcessRecord` / `process_alive`: pid + start time, so a reused pid is never taken for ours.
- `ProcessTree`: the group plus every descendant ever seen (orphans that left the group are still found).
- `stop_tree`: TERM (and CONT for stopped ones), grace, KILL, confirm; never by name.
- `write_pid_file` / `read_pid_file`: `train.pid`, what `fluxgym stop` and a restarted worker read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

from fluxgym._paths import use_sd_scripts
from fluxgym.atomic_files import write_text_atomic

use_sd_scripts()
from library.atomic_io import read_json_object  # noqa: E402

IS_POSIX = os.name == "posix"
PID_FILE = "train.pid"
STOP_MARKER = ".stop-requested"  # written by stop_run: the supervisor must not restart what a user stopped
_SAME_START = 1.0  # seconds: psutil's create_time is rounded differently on some platforms


@dataclass(frozen=True)
class ProcessRecord:
    """Identifies OUR process: pid + start time (a reused pid never matches)."""

    pid: int
    pgid: int | None
    create_time: float | None

    @classmethod
    def of(cls, pid: int, *, own_group: bool = True) -> "ProcessRecord":
        try:
            born = psutil.Process(pid).create_time()
        except psutil.Error:
            born = None
        pgid = None
        if IS_POSIX:
            try:
                pgid = os.getpgid(pid) if not own_group else pid
            except OSError:
                pgid = None
        return cls(pid, pgid if (own_group or pgid == pid) else None, born)


def _same_start(proc: psutil.Process, create_time: float | None) -> bool:
    if create_time is None:
        return False  # unknown start time: we cannot prove it is ours, so it is not
    try:
        return abs(proc.create_time() - create_time) < _SAME_START
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_alive(rec: ProcessRecord) -> bool:
    """True when `rec.pid` is still the process we recorded: same pid AND same start time (within 1 s)."""
    try:
        proc = psutil.Process(rec.pid)
    except psutil.Error:
        return False
    return _running(proc) and _same_start(proc, rec.create_time)


def _group_is_ours(rec: ProcessRecord) -> bool:
    """May the members of `rec.pgid` be signalled? Yes while our leader lives; after it died only if no
    process holds that number now (the kernel never reuses a pid that is still some group's id, so the
    group's remaining members are the leader's)."""
    if not IS_POSIX or not rec.pgid:
        return False
    if rec.pgid == rec.pid and process_alive(rec):
        return True
    try:
        holder = psutil.Process(rec.pgid)
    except psutil.NoSuchProcess:
        return rec.create_time is not None
    except psutil.Error:
        return False
    return rec.pgid == rec.pid and _same_start(holder, rec.create_time)


def _group_members(rec: ProcessRecord) -> list[psutil.Process]:
    if not _group_is_ours(rec):
        return []
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == rec.pgid and proc.create_time() >= (rec.create_time or 0) - _SAME_START:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


class ProcessTree:
    """The run's processes: its group and every descendant of the leader, remembered across refreshes
    so a child that called setsid and lost its parent is still found. psutil.Process objects check the
    start time themselves, so a remembered pid that is reused later is never signalled."""

    def __init__(self, rec: ProcessRecord):
        self.rec = rec
        self.known: dict[int, psutil.Process] = {}
        self.refresh()

    def refresh(self, scan_group: bool = False) -> None:
        """Pick up new descendants; `scan_group` also walks every process for members of the group
        (needed when ending the tree, too slow to do on every check of a long run)."""
        roots = [p for p in self.known.values() if _running(p)]
        if process_alive(self.rec):
            try:
                roots.append(psutil.Process(self.rec.pid))
            except psutil.Error:
                pass
        if scan_group or not self.known:
            roots += _group_members(self.rec)
        for p in roots:
            self.known.setdefault(p.pid, p)
            try:
                for child in p.children(recursive=True):
                    self.known.setdefault(child.pid, child)
            except psutil.Error:
                continue
        self.known.pop(os.getpid(), None)  # never ourselves

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.known.values() if _running(p)]

    def describe(self) -> list[str]:
        lines = []
        for p in sorted(self.alive(), key=lambda q: q.pid):
            try:
                with p.oneshot():
                    cpu = p.cpu_times()
                    lines.append(
                        f"pid {p.pid} ppid {p.ppid()} status {p.status()} rss {p.memory_info().rss >> 20} MiB "
                        f"cpu {cpu.user + cpu.system:.1f} s: {' '.join(p.cmdline()).replace(chr(10), ' ')[:300]}")
            except psutil.Error as exc:
                lines.append(f"pid {p.pid}: {exc.__class__.__name__}")
        return lines or ["(no live processes)"]

    def _signal_all(self, kill: bool) -> None:
        if _group_is_ours(self.rec):
            try:
                os.killpg(self.rec.pgid, signal.SIGKILL if kill else signal.SIGTERM)
            except OSError:
                pass  # group already empty
        cont = getattr(signal, "SIGCONT", None)
        for p in self.alive():
            try:
                p.kill() if kill else p.terminate()
                if cont is not None and not kill:
                    p.send_signal(cont)  # a stopped (SIGSTOP) process acts on TERM only once continued
            except psutil.Error:
                pass

    def terminate(self, grace: float, confirm: float = 10.0) -> list[int]:
        """TERM everything, wait up to `grace` s (picking up late children), KILL the rest; pids still alive."""
        self.refresh(scan_group=True)
        if not self.alive():
            return []
        self._signal_all(kill=False)
        for kill, wait in ((False, grace), (True, confirm)):
            if kill:
                self._signal_all(kill=True)
            end = time.monotonic() + wait
            while time.monotonic() < end:
                self.refresh(scan_group=True)
                if not self.alive():
                    return []
                time.sleep(0.05)
        return [p.pid for p in self.alive()]


def stop_tree(rec: ProcessRecord, grace: float = 10.0) -> list[int]:
    """End the run `rec` identifies: TERM group + descendants, KILL after `grace`; returns pids left.
    A record whose pid now belongs to another process (wrong start time) ends nothing."""
    return ProcessTree(rec).terminate(grace)


def launch(argv: list[str], *, cwd: Path | None, env: dict[str, str] | None,
           output: BinaryIO) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start `argv` with merged stdout/stderr appended to `output` (train.log, never a pipe: a pipe's reader
    dying would kill the run at its next write), in its own session (POSIX) or group (Windows), so neither a
    Ctrl-C meant for the supervisor nor its terminal closing reaches it."""
    kwargs: dict = {"start_new_session": True} if IS_POSIX else {
        "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output,
                            stderr=subprocess.STDOUT, **kwargs)
    return proc, ProcessRecord.of(proc.pid, own_group=IS_POSIX)


def write_pid_file(path: Path, rec: ProcessRecord | None, **extra) -> None:
    """Atomically record the current launch and the supervisor itself (`stop` never reads half a file)."""
    me = ProcessRecord.of(os.getpid(), own_group=False)
    data = {"supervisor": asdict(me), **extra}
    if rec is not None:
        data.update(asdict(rec))
    write_text_atomic(path, json.dumps(data))


def read_pid_file(path: Path) -> dict | None:
    """The pid file's record; None when missing or unreadable (the trainer's one JSON-record reader)."""
    return read_json_object(path)


def record_from(data: dict | None) -> ProcessRecord | None:
    """The trainer's ProcessRecord in a pid file (or a job row), None when it has none."""
    if not data or not isinstance(data.get("pid"), int):
        return None
    return ProcessRecord(data["pid"], data.get("pgid"), data.get("create_time"))


def supervisor_record(data: dict | None) -> ProcessRecord | None:
    sup = (data or {}).get("supervisor")
    if not isinstance(sup, dict) or not isinstance(sup.get("pid"), int):
        return None
    return ProcessRecord(sup["pid"], None, sup.get("create_time"))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code == 0:
        return "exit code 0"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 124:
        return "exit code 124 (a hang guard fired: the trainer stopped a stuck phase)"
    if code > 128 and IS_POSIX:
        try:
            return f"exit code {code} (signal {signal.Signals(code - 128).name})"
        except ValueError:
            return f"exit code {code} (signal {code - 128})"
    return f"exit code {code}"


def running(output_dir: Path) -> dict | None:
    """The pid file of a supervised run in `output_dir` whose supervisor or trainer is still alive, else None."""
    data = read_pid_file(Path(output_dir) / PID_FILE)
    if not data:
        return None
    recs = [record_from(data), supervisor_record(data)]
    return data if any(r is not None and process_alive(r) for r in recs) else None


def stop_run(output_dir: Path, *, grace: float = 10.0) -> tuple[bool, list[int]]:
    """End the supervised run in `output_dir` from anywhere (another terminal): the marker tells its
    supervisor not to restart it, then the trainer's tree is ended. Returns (was running, pids left)."""
    data = read_pid_file(Path(output_dir) / PID_FILE)
    if data is None:
        return False, []
    (Path(output_dir) / STOP_MARKER).write_text(str(time.time()), encoding="utf-8")
    rec = record_from(data)
    was_running = running(output_dir) is not None
    left = stop_tree(rec, grace) if rec is not None else []
    return was_running, left
