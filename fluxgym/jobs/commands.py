"""Queue commands: submit, cancel, resume, retry, delete. Each is a store write; the worker acts on it.

Nothing here starts or ends a process: `cancel` of a running job only sets `stop_requested`, and the
worker (in whatever process hosts it) ends the tree within about a second. So the CLI, the web UI and
another terminal all act on jobs the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from fluxgym.generate import RUN_INFO, GenerateOptions, generate
from fluxgym.jobs.states import ACTIVE_STATES
from fluxgym.jobs.schema import Job
from fluxgym.jobs.store import STORE_DIR, JobStore
from fluxgym.naming import project_paths

SNAPSHOT_DIR = "jobs"  # outputs/.fluxgym/jobs/<id>/: the script each job runs, as it was when queued
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
WAITING = ("queued",) + ACTIVE_STATES


class NothingToDo(Exception):
    """The job is already in the state the command asks for (CLI exit code 3)."""


def _store(root: Path) -> JobStore:
    return JobStore.open(root)


def _job(store: JobStore, job_id: int) -> Job:
    job = store.get(job_id)
    if job is None:
        raise ValueError(f"no job {job_id} in {store.path}; see `python -m fluxgym queue list`")
    return job


def _refuse_second(store: JobStore, lora: str, except_id: int | None = None) -> None:
    for other in store.list(WAITING):
        if other.lora == lora and other.id != except_id:
            raise ValueError(f"LoRA '{lora}' already has job {other.id} ({other.state}); two runs of one LoRA "
                             f"would write the same output folder. Cancel job {other.id} first or wait for it.")


def _snapshot_script(root: Path, job_id: int, script: Path) -> list[str]:
    """Copy the generated script for this job: a later `generate` of the same LoRA must not change it."""
    folder = root / STORE_DIR / SNAPSHOT_DIR / str(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / script.name
    shutil.copy2(script, dest)
    if os.name == "nt":
        return ["cmd", "/d", "/c", str(dest)]
    return ["bash", str(dest)]


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, tok in enumerate(argv[:-1]):
        if tok == flag:
            value = argv[i + 1]
    return value


def _settings(opts: GenerateOptions, out_dir: Path) -> dict:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    try:
        run_info = json.loads((out_dir / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run_info = None
    return {"generate": data, "run": run_info}


def submit(root: str | Path, opts: GenerateOptions) -> Job:
    """Generate the LoRA's scripts (validating everything), then add a queued job that runs them."""
    root = Path(root).resolve()
    opts = dataclasses.replace(opts, root=root)
    store = _store(root)
    slug = project_paths(root, opts.name).slug
    _refuse_second(store, slug)
    res = generate(opts)
    out = res.paths.output_dir
    script = res.files["train.bat" if os.name == "nt" else "train.sh"]
    events = out / EVENTS_FILE
    swap = _flag_value(res.argv, "--blocks_to_swap")
    box: dict = {}

    def snapshot(job_id: int) -> None:  # inside the insert's transaction: no job row without its script
        box["launch"] = _snapshot_script(root, job_id, script)
        store.conn.execute("UPDATE jobs SET launch = ? WHERE id = ?", (json.dumps(box["launch"]), job_id))

    return store.add(lora=slug, name=opts.name, launch=[], argv=res.argv, settings=_settings(opts, out),
                     output_dir=str(out), log_file=str(out / LOG_FILE), events_file=str(events),
                     events_offset=events.stat().st_size if events.is_file() else 0,
                     total_steps=res.expected_steps, blocks_to_swap=int(swap) if swap else None,
                     before_commit=snapshot)


def cancel(root: str | Path, job_id: int) -> Job:
    """queued/interrupted -> stopped at once; an active job gets a stop request the worker carries out."""
    store = _store(root)
    job = _job(store, job_id)
    if job.state in ("queued", "interrupted"):
        return store.transition(job_id, "stopped", why="cancelled", phase=None)
    if job.active:
        if job.stop_requested is not None:
            raise NothingToDo(f"job {job_id} is already being stopped")
        return store.update(job_id, stop_requested=time.time())
    raise NothingToDo(f"job {job_id} is {job.state}; nothing to cancel")


def _check_checkpoint(job: Job, checkpoint: str) -> str:
    from fluxgym.status import checkpoint_validation

    path = Path(checkpoint).expanduser().resolve()
    info = checkpoint_validation().validate_state_dir(path)
    if not info.valid:
        raise ValueError(f"--checkpoint {path} is not a usable state folder: {info.reason}; see "
                         f"`python tools/find_checkpoint.py {job.output_dir}` for the valid ones")
    return str(path)


def _requeue(root: str | Path, job_id: int, resume_from: str, why: str) -> Job:
    store = _store(root)
    job = _job(store, job_id)
    if job.state not in ("failed", "stopped", "interrupted"):
        if job.state == "queued":
            raise NothingToDo(f"job {job_id} is already queued")
        raise ValueError(f"job {job_id} is {job.state}; only a failed, stopped or interrupted job can be re-queued")
    _refuse_second(store, job.lora, except_id=job_id)
    if resume_from != "auto":
        resume_from = _check_checkpoint(job, resume_from)
    return store.transition(job_id, "queued", why=why, resume_from=resume_from, error=None, hint=None,
                            error_lines=[], phase=None, pid=None, pgid=None, create_time=None)


def resume(root: str | Path, job_id: int, checkpoint: str | None = None) -> Job:
    """Queue a finished job again, continuing from `checkpoint` (a state folder) or the newest valid one."""
    return _requeue(root, job_id, checkpoint or "auto", f"resume from {checkpoint or 'the newest checkpoint'}")


def retry(root: str | Path, job_id: int) -> Job:
    """Queue a failed/stopped/interrupted job again with its own command; `--resume auto` lets the trainer
    continue from the newest valid checkpoint when there is one (exact resume), else start fresh."""
    return _requeue(root, job_id, "auto", "retry")


def delete(root: str | Path, job_id: int) -> None:
    """Remove the job's row and its script snapshot; never the LoRA's files. Refused while it runs."""
    root = Path(root).resolve()
    store = _store(root)
    _job(store, job_id)
    store.delete(job_id)
    shutil.rmtree(root / STORE_DIR / SNAPSHOT_DIR / str(job_id), ignore_errors=True)
