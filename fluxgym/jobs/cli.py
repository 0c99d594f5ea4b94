"""`python -m fluxgym queue ...` and `python -m fluxgym worker`: parsing and printing only.

Exit codes (each means one thing):
  0 ok (worker: every job it ran ended done, or there was nothing to run)
  1 worker: a job it ran ended failed, stopped or interrupted
  2 bad input: an unknown job id, an option, or a command the job's state does not allow
  3 nothing to act on: the job is already in the state the command asks for
  4 another worker already runs this project's queue (the message names its pid)
  5 the job store cannot be used: damaged, locked or disk full (the message names the file and what to do)
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from fluxgym.supervise.options import add_deadline_flags, deadlines_from

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING, EXIT_BUSY, EXIT_STORE = 0, 1, 2, 3, 4, 5
LIST_KEYS = ("id", "lora", "state", "phase", "step", "total_steps", "epoch", "last_checkpoint", "lora_file",
             "restarts", "error")


def add_job_parsers(sub, add_common: Callable, add_generate_options: Callable) -> None:
    q = sub.add_parser("queue", help="the job queue: add, list, cancel, retry, resume, delete, repair")
    qs = q.add_subparsers(dest="queue_command", required=True)
    a = qs.add_parser("add", help="generate NAME's scripts (same options as `generate`) and queue a job")
    add_common(a)
    add_generate_options(a)
    ls = qs.add_parser("list", help="every job, newest first")
    add_common(ls, name=False)
    ls.add_argument("--json", action="store_true", help='print {"jobs": [...]}')
    for cmd, text in (("cancel", "stop a queued or running job (the worker ends its process tree)"),
                      ("retry", "queue a failed/stopped/interrupted job again (continues from its newest "
                                "valid checkpoint when there is one)"),
                      ("resume", "queue a failed/stopped/interrupted job to continue from a checkpoint"),
                      ("delete", "remove a job from the list (never its LoRA files)")):
        c = qs.add_parser(cmd, help=text)
        add_common(c, name=False)
        c.add_argument("id", type=int, metavar="ID", help="job id (see `queue list`)")
        if cmd == "resume":
            c.add_argument("--checkpoint", metavar="PATH", help="state folder (default: the newest valid one)")
    r = qs.add_parser("repair", help="move a damaged job store aside and restore its backup")
    add_common(r, name=False)

    w = sub.add_parser("worker", help="run queued jobs under supervision (one per GPU), recovering after crashes")
    add_common(w, name=False)
    w.add_argument("--gpus", help="comma-separated GPU ids, one job on each (default: one job at a time, "
                                  "CUDA_VISIBLE_DEVICES left as it is)")
    w.add_argument("--until-idle", action="store_true", help="exit when nothing is queued or running")
    w.add_argument("--no-recover", action="store_true",
                   help="leave jobs a crash interrupted as `interrupted` instead of resuming them")
    w.add_argument("--grace", type=float, default=10.0, help="seconds between TERM and KILL when ending a run")
    w.add_argument("--echo", action="store_true", help="copy the trainers' output to this console")
    add_deadline_flags(w)  # the same stall deadlines and restart cap as `train` and training_monitor.py


def _print_jobs(jobs, as_json: bool) -> None:
    from fluxgym.status import job_lora_file

    if as_json:
        print(json.dumps({"jobs": [{**j.to_dict(), "lora_file": job_lora_file(j)} for j in jobs]}, indent=2))
        return
    if not jobs:
        print("no jobs; add one with `python -m fluxgym queue add NAME --vram ...`")
        return
    print(f"{'ID':>4}  {'LORA':20}  {'STATE':11}  {'PHASE':15}  {'STEP':>11}  {'EPOCH':>5}  {'RST':>3}  DETAIL")
    for j in jobs:
        step = f"{j.step if j.step is not None else '-'}/{j.total_steps or '?'}"
        detail = j.error or job_lora_file(j) or (f"checkpoint {j.last_checkpoint}" if j.last_checkpoint else "")
        if j.stop_requested and j.active:
            detail = "stop requested; " + detail
        print(f"{j.id:>4}  {j.lora[:20]:20}  {j.state:11}  {(j.phase or '-')[:15]:15}  {step:>11}  "
              f"{j.epoch if j.epoch is not None else '-':>5}  {j.restarts:>3}  {detail}")


def run_queue(a, root: Path, generate_options: Callable) -> int:
    from fluxgym.jobs import commands
    from fluxgym.jobs.store import JobStore, StoreError, repair

    try:
        cmd = a.queue_command
        if cmd == "add":
            job = commands.submit(root, generate_options(a, root))
            print(f"queued job {job.id} for '{job.lora}' ({job.total_steps} steps); "
                  f"run it with `python -m fluxgym worker`")
        elif cmd == "list":
            _print_jobs(JobStore.open(root).list(), a.json)
        elif cmd == "cancel":
            job = commands.cancel(root, a.id)
            print(f"job {a.id}: " + ("stopped" if job.state == "stopped" else "stop requested; the worker ends it"))
        elif cmd in ("retry", "resume"):
            job = (commands.retry(root, a.id) if cmd == "retry"
                   else commands.resume(root, a.id, a.checkpoint))
            print(f"job {a.id}: queued again (resume from {job.resume_from})")
        elif cmd == "delete":
            commands.delete(root, a.id)
            print(f"job {a.id}: deleted (its LoRA files are kept)")
        elif cmd == "repair":
            moved, count = repair(root)
            print(f"damaged store moved to {moved}" if moved else "no store file was there")
            print(f"restored {count} job(s) from the backup" if count else "started an empty job store")
        return EXIT_OK
    except commands.NothingToDo as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_NOTHING
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORE


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # the worker ends its runs (their jobs become `interrupted`) and releases the lock


def run_worker(a, root: Path) -> int:
    from fluxgym.jobs.lock import WorkerBusyError
    from fluxgym.jobs.store import StoreError
    from fluxgym.jobs.worker import Worker
    from fluxgym.supervise import RestartPolicy

    gpus = [g.strip() for g in a.gpus.split(",") if g.strip()] if a.gpus else None
    if a.gpus is not None and not gpus:
        print("error: --gpus needs ids such as 0,1", file=sys.stderr)
        return EXIT_USAGE
    if a.max_restarts < 0:
        print(f"error: --max-restarts {a.max_restarts}: must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    worker = Worker(root, gpus=gpus, recover=not a.no_recover, grace=a.grace, deadlines=deadlines_from(a),
                    policy=RestartPolicy(max_restarts=a.max_restarts), echo=sys.stdout if a.echo else None)
    # TERM ends the worker like Ctrl-C. A closed terminal (HUP) does not: the worker and its trainings go on
    # without a console (they write their own logs), as after `nohup`.
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if hasattr(signal, "SIGHUP"):
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    t0 = time.monotonic()
    try:
        code = worker.run_until_idle() if a.until_idle else worker.run_forever()
    except KeyboardInterrupt:
        code = worker.exit_code()
        print("worker stopped; jobs it was running are `interrupted` and resume when a worker starts again",
              file=sys.stderr)
    except WorkerBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORE
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if worker.store_error is not None:
        print(f"error: {worker.store_error}", file=sys.stderr)
        return EXIT_STORE
    ran = worker.ran
    summary = ", ".join(f"job {i} {s}" for i, s in sorted(ran.items())) or "no job ran"
    print(f"worker done after {time.monotonic() - t0:.0f} s: {summary}")
    return code
