"""Crash recovery: make the store agree with the processes and files that exist when a worker starts.

For every job the store calls running/stalled/recovering:
- its process is alive (same pid AND start time, or the run's own train.pid when the worker died before
  recording it) -> adopted: the worker watches it again with `Supervisor.attach`; never started twice;
- its process is gone but the run finished meanwhile (heartbeat `done`, a valid final LoRA written after
  the job started) -> done;
- otherwise -> interrupted, and with `recover` re-queued to resume from its newest valid checkpoint.
A pid that now belongs to another process (after a reboot) fails the start-time check: it is never
adopted and never signalled. Jobs left `interrupted` earlier are re-queued the same way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fluxgym.jobs.states import ACTIVE_STATES
from fluxgym.jobs.schema import Job
from fluxgym.jobs.store import JobStore
from fluxgym.status import checkpoint_validation, finished_unwatched
from fluxgym.supervise import ProcessRecord, process_alive
from fluxgym.supervise.process import PID_FILE, read_pid_file, record_from

log = logging.getLogger(__name__)


def _recorded(job: Job) -> ProcessRecord | None:
    if job.pid is None or job.create_time is None:
        return None  # without a start time a pid cannot be told apart from a reused one: never adopted
    return ProcessRecord(job.pid, job.pgid, job.create_time)


def _from_pid_file(job: Job) -> ProcessRecord | None:
    """The run's own train.pid, when the worker died between the launch and recording the pid."""
    rec = record_from(read_pid_file(Path(job.output_dir) / PID_FILE))
    # Only a process started after this job was: an older run of the same LoRA is not this job's.
    if rec is None or rec.create_time is None or job.started is None or rec.create_time < job.started - 1.0:
        return None
    return rec


def live_process(job: Job) -> ProcessRecord | None:
    for rec in (_recorded(job), _from_pid_file(job) if job.pid is None else None):
        if rec is not None and process_alive(rec):
            return rec
    return None


def finished_meanwhile(job: Job) -> Path | None:
    """The final LoRA when the run ended well while no worker watched it, else None."""
    return finished_unwatched(Path(job.output_dir), job.lora, job.started or job.created)


def newest_checkpoint(job: Job) -> tuple[str | None, int | None]:
    try:
        info = checkpoint_validation().newest_valid_state(Path(job.output_dir), output_name=job.lora, log=False)
    except (ImportError, OSError):
        return None, None
    return (str(info.path), info.step) if info is not None else (None, None)


def reconcile(store: JobStore, *, recover: bool = True) -> list[tuple[Job, ProcessRecord]]:
    """Bring every unfinished job in line with reality; returns the (job, process) pairs to adopt."""
    adopt: list[tuple[Job, ProcessRecord]] = []
    for job in sorted(store.list(ACTIVE_STATES), key=lambda j: j.id):
        rec = live_process(job)
        if rec is not None:
            log.info("job %s (%s): its process %s is still running; watching it again", job.id, job.lora, rec.pid)
            job = store.update(job.id, pid=rec.pid, pgid=rec.pgid, create_time=rec.create_time)
            adopt.append((job, rec))
            continue
        lora = finished_meanwhile(job)
        if lora is not None:
            store.transition(job.id, "done", why="finished while no worker watched it", lora_file=str(lora),
                             phase="done", pid=None, pgid=None, create_time=None, step=job.total_steps)
            log.info("job %s (%s): finished while no worker watched it: %s", job.id, job.lora, lora)
            continue
        if job.stop_requested is not None:
            store.transition(job.id, "stopped", why="stop requested; its process is gone", pid=None, pgid=None,
                             create_time=None, phase=None)
            continue
        gone = f"pid {job.pid} is gone" if job.pid else "it had not started"
        reason = {"reason": "interrupted", "detail": f"the worker or the machine stopped while it ran ({gone})",
                  "at_step": job.step, "time": time.time()}
        store.transition(job.id, "interrupted", why=reason["detail"], pid=None, pgid=None, create_time=None,
                         restart_reasons=job.restart_reasons + [reason], phase=None)
        log.warning("job %s (%s): interrupted (%s)", job.id, job.lora, gone)
    if recover:
        for job in sorted(store.list(("interrupted",)), key=lambda j: j.id):
            path, step = newest_checkpoint(job)
            store.transition(job.id, "queued", why="recovery: resume from the newest valid checkpoint",
                             resume_from="auto", restarts=job.restarts + 1, last_checkpoint=path,
                             last_checkpoint_step=step, queued=job.queued)  # keeps its place in the queue
            log.info("job %s (%s): re-queued to resume from %s", job.id, job.lora, path or "the start (no checkpoint)")
    return adopt
