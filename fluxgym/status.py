"""What a run is doing, from files only: heartbeat.json, the pid file, last_run.json and the log tail.

Also the bridge to the shared checkpoint validation (`sd-scripts/library/checkpoint_validation.py`,
the same code `tools/find_checkpoint.py` and the trainer use) for `resume`. Stdlib + psutil only.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from fluxgym.naming import ProjectPaths
from fluxgym.proctree import leader_alive, read_pid_file
from fluxgym.runner import LAST_RUN, LOG_FILE, PID_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = "heartbeat.json"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def log_tail(path: Path, lines: int = 10, max_bytes: int = 65536) -> list[str]:
    """Last non-empty lines of a log; tqdm's `\\r` updates count as lines."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    parts = [p for p in data.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-lines:]


def checkpoint_validation():
    """The shared validation module from this repository's sd-scripts (stdlib only)."""
    sd = str(REPO_ROOT / "sd-scripts")
    if sd not in sys.path:
        sys.path.insert(0, sd)
    return importlib.import_module("library.checkpoint_validation")


def earlier_runs(paths: ProjectPaths) -> list[dict]:
    """Runs whose files a fresh start moved to outputs/<name>/runs/<id>/ (the trainer's run_identity)."""
    try:
        checkpoint_validation()  # puts sd-scripts on the path
        return importlib.import_module("library.run_identity").archived_runs(paths.output_dir)
    except (ImportError, OSError):
        return []


def newest_valid_state(paths: ProjectPaths):
    """CheckpointInfo of the newest complete state folder of this LoRA, or None."""
    return checkpoint_validation().newest_valid_state(paths.output_dir, output_name=paths.slug)


def run_status(paths: ProjectPaths, *, lines: int = 10) -> dict:
    hb = _read_json(paths.out(HEARTBEAT))
    pid_info = read_pid_file(paths.out(PID_FILE))
    running = bool(pid_info and leader_alive(pid_info))
    last = _read_json(paths.out(LAST_RUN))
    if running:
        state = "running"
    elif last is not None:
        state = "succeeded" if last.get("success") else ("stopped" if last.get("stopped") else "failed")
    elif pid_info:
        state = "ended (no verdict recorded: the supervising process died)"
    else:
        state = "not started"
    out = {"name": paths.slug, "state": state, "pid": pid_info["pid"] if running else None,
           "phase": None, "step": None, "total_steps": None, "epoch": None, "total_epochs": None,
           "last_checkpoint": None, "heartbeat_age_s": None, "message": None,
           "last_run": last, "log_tail": log_tail(paths.out(LOG_FILE), lines), "run_id": None,
           "earlier_runs": earlier_runs(paths)}
    if hb:
        for key in ("phase", "step", "total_steps", "epoch", "total_epochs", "last_checkpoint", "message", "run_id"):
            out[key] = hb.get(key)
        if isinstance(hb.get("time"), (int, float)):
            out["heartbeat_age_s"] = round(time.time() - hb["time"], 1)
    return out


def format_status(st: dict) -> str:
    lines = [f"{st['name']}: {st['state']}" + (f" (pid {st['pid']})" if st["pid"] else "")]
    if st["phase"] is not None:
        age = f", heartbeat {st['heartbeat_age_s']:.0f} s ago" if st["heartbeat_age_s"] is not None else ""
        lines.append(f"phase: {st['phase']}{age}")
        lines.append(f"step: {st['step']}/{st['total_steps']}  epoch: {st['epoch']}/{st['total_epochs']}")
        if st["message"]:
            lines.append(f"message: {st['message']}")
    lines.append(f"last checkpoint: {st['last_checkpoint'] or 'none'}")
    if st.get("run_id") is not None:
        lines.append(f"run: {st['run_id']}")
    for run in st.get("earlier_runs") or []:
        lines.append(f"earlier run {run['run_id']}: {len(run['states'])} state folder(s), "
                     f"{len(run['lora_files'])} LoRA file(s) in {run['path']}")
    if st["last_run"] and st["state"] != "running":
        lr = st["last_run"]
        lines.append(f"last run: exit code {lr.get('exit_code')}, LoRA: {lr.get('lora') or 'not written'}")
    if st["log_tail"]:
        lines.append("log:")
        lines += [f"  {line}" for line in st["log_tail"]]
    return "\n".join(lines)
