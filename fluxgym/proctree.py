"""Our own training process tree: the pid file, and ending the tree for good.

The trainer starts in a new session, so its process group holds it and every helper it spawns. The
pid file records pid, group and start time (a reused pid is never signalled). Stopping sends TERM to
the group and to any descendant that left it, waits a grace period, then KILLs and confirms nothing
is left. Processes are never chosen by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

IS_POSIX = os.name == "posix"


def write_pid_file(path: Path, proc_pid: int) -> dict:
    """Record the launched process; written atomically so `stop` never reads half a file."""
    info = {"pid": proc_pid, "pgid": proc_pid, "runner_pid": os.getpid(), "started": time.time()}
    try:
        info["create_time"] = psutil.Process(proc_pid).create_time()
    except psutil.Error:
        info["create_time"] = None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, path)
    return info


def read_pid_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def leader_alive(info: dict) -> bool:
    """True when the recorded pid is still the process we launched (not a reused pid)."""
    try:
        proc = psutil.Process(info["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        ct = info.get("create_time")
        return ct is None or abs(proc.create_time() - ct) < 1.0
    except psutil.Error:
        return False


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def tree_members(info: dict) -> list[psutil.Process]:
    """Live processes of the run: the process group plus descendants of the leader that left it."""
    found: dict[int, psutil.Process] = {}
    pgid = info.get("pgid")
    if IS_POSIX and pgid:
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid:
                    found[proc.pid] = proc
            except (OSError, psutil.Error):
                pass
    if leader_alive(info):
        try:
            leader = psutil.Process(info["pid"])
            found[leader.pid] = leader
            for child in leader.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)  # never ourselves (runner in the same group on odd platforms)
    return _alive(list(found.values()))


def _signal_all(info: dict, procs: list[psutil.Process], sig: int) -> None:
    pgid = info.get("pgid")
    if IS_POSIX and pgid and pgid != os.getpgid(0):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def stop_tree(info: dict, *, grace: float = 10.0, confirm: float = 5.0) -> list[int]:
    """TERM the run's tree, KILL what is left after `grace`; returns pids still alive (normally [])."""
    term = signal.SIGTERM
    kill = signal.SIGKILL if IS_POSIX else signal.SIGTERM
    members = tree_members(info)
    if not members:
        return []
    _signal_all(info, members, term)
    _, alive = psutil.wait_procs(members, timeout=grace)
    # Re-collect: a process may have forked during the grace period.
    alive = _alive(list({p.pid: p for p in alive + tree_members(info)}.values()))
    if alive:
        _signal_all(info, alive, kill)
        psutil.wait_procs(alive, timeout=confirm)
    deadline = time.monotonic() + confirm
    left = tree_members(info)
    while left and time.monotonic() < deadline:
        _signal_all(info, left, kill)
        time.sleep(0.1)
        left = tree_members(info)
    return [p.pid for p in left]


def popen_kwargs() -> dict:
    """Start the trainer in its own session/process group so the whole tree can be signalled."""
    if IS_POSIX:
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def describe_exit(code: int) -> str:
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
        return f"exit code {code} (signal {code - 128})"
    return f"exit code {code}"

