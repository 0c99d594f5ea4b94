"""Stall reports: what a stuck run was doing when the supervisor ended it.

`write_stall_report` gathers the verdict, the process tree, the Python stacks (our trainer dumps them on
SIGUSR1; py-spy for others when installed), a GPU snapshot (secondary information only) and the last log
lines into `stall-<time>.txt` in the output folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


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
        "# Training stall report (fluxgym supervisor)", *summary, "",
        "## Process tree", *tree, "",
        "## Python stacks (SIGUSR1)", stacks, "",
        "## GPU", gpu, "",
        f"## Last {len(log_lines)} log lines", *log_lines, "",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
