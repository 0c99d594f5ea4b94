"""What a run is doing, from files only: events.jsonl, the heartbeats and the supervisor's pid file.

Also the bridge to the shared checkpoint validation (`sd-scripts/library/checkpoint_validation.py`,
the same code `tools/find_checkpoint.py` and the trainer use) for `resume`. Stdlib + psutil only.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from fluxgym._paths import use_sd_scripts
from fluxgym.naming import ProjectPaths
from fluxgym.runner import EVENTS_FILE, LAST_RUN, LOG_FILE
from fluxgym.supervise.events import tail_events
from fluxgym.supervise.progress import read_heartbeat
from fluxgym.supervise.process import PID_FILE, process_alive, read_pid_file, record_from, running, supervisor_record

use_sd_scripts()
from library.atomic_io import read_json_object  # noqa: E402

# The state `status` shows for how a run ended: the supervisor's final event kinds and the trainer's final
# heartbeat phases use the same three names.
VERDICTS = {"done": "succeeded", "failed": "failed", "stopped": "stopped"}


def log_tail(path: Path, lines: int = 10, max_bytes: int = 65536) -> list[str]:
    """Last non-empty lines of a log; tqdm's `\\r` updates count as lines (for error reports, not status)."""
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
    use_sd_scripts()
    return importlib.import_module("library.checkpoint_validation")


def job_lora_file(job) -> str | None:
    """Where a queue job's LoRA file is now. A later fresh start of the same LoRA moves it to runs/<id>/ (the
    trainer keeps runs apart), so the path stored when the job finished is followed there, through the run id
    its "done" event recorded; the stored path when the file is where it was or cannot be found."""
    stored = job.lora_file
    if not stored or not job.output_dir or not job.events_file or Path(stored).is_file():
        return stored
    from fluxgym.supervise import read_events

    try:
        events, _ = read_events(Path(job.events_file), 0)
    except OSError:
        return stored
    runs = [e.get("trainer_run") for e in events if e.get("event") == "done"]
    if not runs or not isinstance(runs[-1], int):
        return stored
    found = checkpoint_validation().archived_file(Path(job.output_dir), Path(stored).name, runs[-1])
    return str(found) if found is not None and found.is_file() else stored


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


def finished_unwatched(output_dir: Path, lora_name: str, since: float) -> Path | None:
    """The final LoRA when a run that began at `since` (unix s) finished well while no supervisor watched
    it (heartbeat `done`, a valid `<lora_name>.safetensors` written since then), else None."""
    hb = read_heartbeat(output_dir)
    if hb is None or hb.get("phase") != "done" or float(hb.get("time") or 0) < since - 1.0:
        return None
    lora = Path(output_dir) / f"{lora_name}.safetensors"
    try:
        if lora.stat().st_mtime < since - 1.0:
            return None  # an earlier run's file
    except OSError:
        return None
    return lora if checkpoint_validation().validate_lora_file(lora).valid else None


def _unwatched_end(paths: ProjectPaths) -> Path | None:
    """A `train` whose supervisor died (killed, or an older version's closed terminal) while the trainer went
    on: its final LoRA when the trainer then finished on its own."""
    rec = record_from(read_pid_file(paths.out(PID_FILE)))
    if rec is None or rec.create_time is None:
        return None
    return finished_unwatched(paths.output_dir, paths.slug, rec.create_time)


def _describe(ev: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("time", 0)))
    return f"{stamp} {ev.get('message') or ev.get('event')}"


def trainer_holding(paths: ProjectPaths) -> dict | None:
    """The trainer that holds the output folder's lock (however it was started: train.sh, the monitor), or None."""
    try:
        checkpoint_validation()  # puts sd-scripts on the path
        return importlib.import_module("library.output_lock").read_lock_holder(paths.output_dir)
    except (ImportError, OSError):
        return None


def run_status(paths: ProjectPaths, *, lines: int = 10) -> dict:
    """State, phase, step, loss and speed, last checkpoint, restarts and the last events of this LoRA's run."""
    events = tail_events(paths.out(EVENTS_FILE))
    run_id = events[-1].get("run") if events else None
    mine = [e for e in events if e.get("run") == run_id]
    last = {e["event"]: e for e in mine}  # the last event of each kind in the newest run
    verdict = next((e for e in reversed(mine) if e["event"] in VERDICTS), None)
    live = running(paths.output_dir)
    last_run = read_json_object(paths.out(LAST_RUN))
    hb = read_heartbeat(paths.output_dir)
    holder = trainer_holding(paths) if live is None else None
    # A run fluxgym never supervised (bash train.sh) has no events, only the trainer's heartbeat.
    hb_only = bool(hb) and not mine and last_run is None
    # ... or one that ended (stopped, failed, done) after the last supervised run's events.
    hb_ended_later = (bool(hb) and hb.get("phase") in VERDICTS and isinstance(hb.get("time"), (int, float))
                      and hb["time"] > max([e.get("time", 0) for e in mine[-1:]] + [0]))
    unwatched = _unwatched_end(paths) if live is None and verdict is None and mine else None
    if live is not None:
        state = "running"
    elif holder is not None:
        state = "running (not under fluxgym's supervisor)"
        live = {"pid": holder.get("pid")}
    elif hb_only or hb_ended_later:
        state = VERDICTS.get(hb.get("phase"),
                                       f"ended (no trainer holds the folder; its heartbeat last said {hb.get('phase')})")
    elif verdict is not None:
        state = VERDICTS[verdict["event"]]
    elif unwatched is not None:
        state = "succeeded"
    elif mine and mine[-1]["event"] != "done":
        state = "ended (no verdict recorded: the supervising process died)"
    elif last_run is not None:  # a run from before events existed
        state = "succeeded" if last_run.get("success") else ("stopped" if last_run.get("stopped") else "failed")
    else:
        state = "not started"
    step_ev = last.get("step", {})
    sup = supervisor_record(live)
    out = {"name": paths.slug, "state": state, "pid": (live or {}).get("pid") if live else None,
           # False: the trainer runs on after its supervisor died (no stall detection or auto-resume now)
           "supervised": bool(sup is not None and process_alive(sup)) if live else None,
           "phase": (last.get("phase") or {}).get("phase"), "step": step_ev.get("step"),
           "total_steps": step_ev.get("total_steps"), "epoch": step_ev.get("epoch"), "total_epochs": None,
           "loss": step_ev.get("loss"), "it_per_s": step_ev.get("it_per_s"), "eta_s": step_ev.get("eta_s"),
           "last_checkpoint": (last.get("checkpoint") or {}).get("path"), "heartbeat_age_s": None, "message": None,
           "restarts": [{k: e.get(k) for k in ("reason", "detail", "blocks_to_swap", "time")}
                        for e in mine if e["event"] == "restart"],
           "error": (verdict or {}).get("error"), "hint": (verdict or {}).get("hint"),
           "lora_file": (verdict or {}).get("lora_file") or (str(unwatched) if unwatched else None),
           "last_run": last_run,
           "events": [_describe(e) for e in mine if e["event"] != "step"][-lines:] if lines > 0 else [],
           "log_file": str(paths.out(LOG_FILE)), "run_id": None,
           "earlier_runs": earlier_runs(paths)}
    if hb:  # the trainer's own word is fresher than the last (throttled) step event
        for key in ("phase", "step", "total_steps", "epoch", "total_epochs", "last_checkpoint", "message", "loss",
                    "run_id"):
            if hb.get(key) is not None:
                out[key] = hb[key]
        if isinstance(hb.get("time"), (int, float)):
            out["heartbeat_age_s"] = round(time.time() - hb["time"], 1)
    return out


def format_status(st: dict) -> str:
    lines = [f"{st['name']}: {st['state']}" + (f" (pid {st['pid']})" if st["pid"] else "")]
    if st.get("supervised") is False:
        lines.append(f"its supervisor is gone: training goes on without stall detection or auto-resume; "
                     f"`python -m fluxgym stop {st['name']}` ends it")
    if st["phase"] is not None:
        age = f", heartbeat {st['heartbeat_age_s']:.0f} s ago" if st["heartbeat_age_s"] is not None else ""
        lines.append(f"phase: {st['phase']}{age}")
        lines.append(f"step: {st['step']}/{st['total_steps']}  epoch: {st['epoch']}/{st['total_epochs']}")
        extra = []
        if st["loss"] is not None:
            extra.append(f"loss {st['loss']:.4g}")
        if st["it_per_s"]:
            extra.append(f"{st['it_per_s']:.3g} it/s")
        if st["eta_s"] is not None and st["state"] == "running":
            extra.append(f"about {st['eta_s'] / 60:.0f} min left")
        if extra:
            lines.append(", ".join(extra))
        if st["message"]:
            lines.append(f"message: {st['message']}")
    lines.append(f"last checkpoint: {st['last_checkpoint'] or 'none'}")
    if st.get("run_id") is not None:
        lines.append(f"run: {st['run_id']}")
    for run in st.get("earlier_runs") or []:
        lines.append(f"earlier run {run['run_id']}: {len(run['states'])} state folder(s), "
                     f"{len(run['lora_files'])} LoRA file(s) in {run['path']}")
    if st["restarts"]:
        lines.append(f"restarts: {len(st['restarts'])} (" + ", ".join(r["reason"] for r in st["restarts"]) + ")")
    if st["state"] == "succeeded" and st["lora_file"]:
        lines.append(f"LoRA: {st['lora_file']}")
    if st["error"] and st["state"] != "running":
        lines.append(f"error: {st['error']}")
    if st["hint"] and st["state"] != "running":
        lines.append(st["hint"])
    if st["events"]:
        lines.append("recent events:")
        lines += [f"  {line}" for line in st["events"]]
    lines.append(f"log: {st['log_file']}")
    return "\n".join(lines)
