"""Stall reports: what a stuck run was doing when the supervisor ended it.

`write_stall_report` gathers the verdict, the process tree, the Python stacks (our trainer dumps them on
SIGUSR1; py-spy for others when installed), a GPU snapshot (secondary information only) and the last log
lines into `stall-<time>.txt` in the output folder.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

PHASE_HINTS = {
    "loading": "model loading or the silent hashing of the base model; check disk speed and free RAM",
    "caching_latents": "latent caching; check the dataset disk and the VAE device",
    "caching_text": "text-encoder caching; T5 on CPU is slow, check free RAM",
    "training": "a training step; check the GPU (nvidia-smi) and read the Python stacks above",
    "saving": "writing a checkpoint; check free space and the output disk",
    "sampling": "sample image generation; use fewer sample steps or sample less often",
}

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


def _status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "gone"


def stall_report(output_dir: Path, stall, tracker, tree, lines: list[str], *, argv: list[str],
                 dump_wait: float) -> Path:
    """The report for `stall`: each live rank's stacks (our trainer dumps them on SIGUSR1; py-spy for
    others), the verdict, every rank's last heartbeat, the process tree and the last log lines."""
    hb = tracker.heartbeat
    alive = {p.pid for p in tree.alive()}
    pids = [r.hb.get("pid") for _, r in sorted(tracker.ranks.items())]
    pids = [p for p in pids if isinstance(p, int) and p in alive]
    stacks = "(no heartbeat from our trainer: upstream sd-scripts has no on-demand stack dump)"
    if pids:
        parts = []
        for pid in pids[:8]:
            if _status(pid) == psutil.STATUS_STOPPED:
                parts.append(f"(pid {pid} is stopped (state T, e.g. SIGSTOP or Ctrl-Z): it cannot dump its stacks)")
            else:
                parts.append(request_stack_dump(pid, output_dir, dump_wait))
        stacks = "\n\n".join(parts)
    else:
        stacks = py_spy_dump(sorted(alive)) or stacks
    summary = [
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"verdict: {stall.describe()} (progress source: {stall.source})",
        f"phase: {stall.phase}  step: {stall.step}  epoch: {(hb or {}).get('epoch', tracker.parser.state.epoch)}",
        f"likely area: {PHASE_HINTS.get(stall.phase, 'unknown phase')}",
        f"heartbeat: {json.dumps(hb) if hb else '(none)'}",
        *tracker.rank_lines(),
        f"command: {shlex.join(argv) if argv else '(attached)'}",
    ]
    return write_stall_report(output_dir, summary=summary, tree=tree.describe(), stacks=stacks, log_lines=lines,
                              gpu=gpu_snapshot())
