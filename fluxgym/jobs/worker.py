"""The worker: runs queued jobs through the supervisor, one per GPU slot, and keeps the store true.

- Start: take the store's worker lock, then reconcile (recovery.py): adopt live runs, re-queue lost ones.
- Every ~second (`_tick`): record finished runs, flush progress, carry out stop requests, fill free slots.
- Each run is a thread calling `Supervisor.run` (or `.attach` for an adopted one); its events become job
  transitions and progress fields here (`_on_event`), progress at most about once a second per job.
- A store write that fails (disk full, locked) never ends a training: the worker takes no new job, lets
  the running ones finish, and exits with the store's error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fluxgym.jobs.lock import WorkerLock
from fluxgym.jobs.recovery import reconcile
from fluxgym.jobs.schema import Job
from fluxgym.jobs.store import JobStore, StoreError, StoreLockedError
from fluxgym.status import log_tail
from fluxgym.supervise import Deadlines, ProcessRecord, RestartPolicy, RunSpec, Supervisor

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0  # seconds between progress writes of one job
_ERROR_WORDS = ("error", "exception", "traceback", "killed", "out of memory", "hang guard")


@dataclass
class _Run:
    job_id: int
    lora: str
    slot: str | None
    sup: Supervisor | None = None
    thread: threading.Thread | None = None
    stopping: bool = False
    closing: bool = False  # stopped because the worker closes (-> interrupted, resumed next start)
    pending: dict = field(default_factory=dict)  # progress not yet written
    last_flush: float = 0.0
    outcome: object | None = None
    crash: BaseException | None = None


def _progress_fields(ev: dict) -> dict:
    keys = {"step": "step", "total_steps": "total_steps", "epoch": "epoch", "it_per_s": "it_per_s",
            "eta_s": "eta_s"}
    return {col: ev[k] for k, col in keys.items() if ev.get(k) is not None}


class Worker:
    """See the module docstring. `gpus=None`: one job at a time, CUDA_VISIBLE_DEVICES left alone."""

    def __init__(self, root: str | Path, gpus: list[str] | None = None, recover: bool = True, *,
                 deadlines: Deadlines | None = None, policy: RestartPolicy | None = None, poll: float = 1.0,
                 grace: float = 10.0, echo=None, supervisor_factory: Callable[..., Supervisor] | None = None,
                 store_timeout: float = 10.0):
        self.root = Path(root).resolve()
        self.slots: list[str | None] = list(gpus) if gpus else [None]
        self.recover = recover
        self.deadlines, self.policy = deadlines, policy
        self.poll, self.grace, self.echo = poll, grace, echo
        self.store_timeout = store_timeout  # how long one store access waits for another program's lock
        self._make_supervisor = supervisor_factory or Supervisor
        self.store: JobStore | None = None
        self._lock = WorkerLock(JobStore.path_for(self.root).parent)
        self._runs: dict[int, _Run] = {}
        self._mutex = threading.RLock()  # events arrive on the supervisors' threads
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.ran: dict[int, str] = {}  # job id -> final state, for jobs this worker ran or adopted
        self.store_error: StoreError | None = None  # damaged or full: the worker winds down
        self._locked_warned = False

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Lock, open the store and reconcile it with the processes that exist. Raises WorkerBusyError."""
        self._lock.acquire()
        try:
            self.store = JobStore.open(self.root, timeout=self.store_timeout)
            for job, rec in reconcile(self.store, recover=self.recover):
                free = self._free_slots()
                # An adopted run keeps its GPU; it may exceed the slots when the worker restarts with fewer.
                self._start(job, job.gpu if job.gpu in free or not free else free[0], adopt=rec)
        except BaseException:
            self._lock.release()
            raise

    def run_until_idle(self) -> int:
        """Run until nothing is queued or running. 0 when every job it ran ended done, else 1."""
        self.open()
        try:
            self._loop(until_idle=True)
        finally:
            self._shutdown()
        return self.exit_code()

    def run_forever(self) -> int:
        """Run until `close()` (or Ctrl-C in the CLI)."""
        self.open()
        try:
            self._loop(until_idle=False)
        finally:
            self._shutdown()
        return self.exit_code()

    def start(self) -> None:
        """Run in a background thread (the web UI hosts the worker this way)."""
        self.open()
        self._thread = threading.Thread(target=self._background, name="fluxgym-worker", daemon=True)
        self._thread.start()

    def _background(self) -> None:
        try:
            self._loop(until_idle=False)
        finally:
            self._shutdown()

    def close(self, grace: float | None = None) -> None:
        """Stop taking jobs, end the running trees (their jobs become `interrupted`), release the lock."""
        if grace is not None:
            self.grace = grace
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def exit_code(self) -> int:
        if self.store_error is not None:
            return 5
        return 0 if all(state == "done" for state in self.ran.values()) else 1

    # ------------------------------------------------------------ the loop

    def _loop(self, until_idle: bool) -> None:
        while True:
            self._tick()
            with self._mutex:
                busy = bool(self._runs)
            if self._closing or self.store_error is not None:
                if not busy:
                    return
                if self._closing:
                    self._stop_all()
            elif until_idle and not busy and self._idle():
                return
            self._wake.wait(self.poll)
            self._wake.clear()

    def _tick(self) -> None:
        with self._mutex:  # the supervisors' threads write events under the same lock
            for run in list(self._runs.values()):
                if run.thread is not None and not run.thread.is_alive():
                    self._finish(run)
                    continue
                self._flush(run, force=False)
                self._check_stop_request(run)
            if not self._closing and self.store_error is None:
                self._fill_slots()

    def _guard(self, fn: Callable, *args, **kw):
        """Run a store access. A lock held by another program is waited out (the next tick tries again); any
        other StoreError is remembered and the worker winds down. Either way nothing is raised."""
        try:
            result = fn(*args, **kw)
            self._locked_warned = False
            return result
        except StoreLockedError as exc:
            if not self._locked_warned:
                log.warning("%s (the worker keeps trying)", exc)
                self._locked_warned = True
            return None
        except StoreError as exc:
            if self.store_error is None:
                log.error("%s", exc)
                log.error("the worker takes no new job; running trainings continue and keep their output")
            self.store_error = exc
            return None

    def _free_slots(self) -> list[str | None]:
        free = list(self.slots)
        for run in self._runs.values():
            if run.slot in free:
                free.remove(run.slot)
        return free

    def _idle(self) -> bool:
        """Nothing queued (a store locked by another program is not proof of that: wait and look again)."""
        nothing = object()
        found = self._guard(lambda: self.store.next_queued({r.lora for r in self._runs.values()}) or nothing)
        return found is nothing

    def _next_job(self) -> Job | None:
        return self._guard(self.store.next_queued, {r.lora for r in self._runs.values()})

    def _fill_slots(self) -> None:
        while True:
            free = self._free_slots()
            job = self._next_job() if free else None
            if job is None:
                return
            slot = free[0]
            job = self._guard(self.store.transition, job.id, "running", why="launched by the worker",
                              gpu=slot, worker_pid=os.getpid(), phase="launching", pid=None, pgid=None,
                              create_time=None, error=None, hint=None)
            if job is None:
                return
            self._start(job, slot)

    # ------------------------------------------------------------ one run

    def _spec(self, job: Job, slot: str | None) -> RunSpec:
        env = {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None
        launch = list(job.launch)
        if job.blocks_to_swap is not None and job.blocks_to_swap != _swap_in(job.argv):
            launch += ["--blocks_to_swap", str(job.blocks_to_swap)]  # raised by an OOM retry: keep it
        out = Path(job.output_dir)
        return RunSpec(argv=launch, cwd=self.root, output_dir=out, output_name=job.lora, env=env,
                       log_path=Path(job.log_file) if job.log_file else None,
                       events_path=Path(job.events_file) if job.events_file else None,
                       job_id=job.id, blocks_to_swap=job.blocks_to_swap,
                       resume_command=f"python -m fluxgym queue retry {job.id}")

    def _start(self, job: Job, slot: str | None, adopt: ProcessRecord | None = None) -> None:
        run = _Run(job.id, job.lora, slot)
        run.sup = self._make_supervisor(self._spec(job, slot), deadlines=self.deadlines, policy=self.policy,
                                        on_event=lambda ev, r=run: self._on_event(r, ev), echo=self.echo)
        resume = job.resume_from

        def body() -> None:
            try:
                run.outcome = run.sup.attach(adopt) if adopt is not None else run.sup.run(resume=resume)
            except BaseException as exc:  # a bug or a launch error: the job fails, the worker goes on
                log.exception("job %s: the supervisor raised", job.id)
                run.crash = exc
            finally:
                self._wake.set()

        run.thread = threading.Thread(target=body, name=f"fluxgym-job-{job.id}", daemon=True)
        with self._mutex:
            self._runs[job.id] = run
        log.info("job %s (%s): %s%s", job.id, job.lora, "adopted pid %s" % adopt.pid if adopt else "started",
                 f" on GPU {slot}" if slot is not None else "")
        run.thread.start()

    def _check_stop_request(self, run: _Run) -> None:
        if run.stopping:
            return
        job = self._guard(self.store.get, run.job_id)
        if job is not None and job.stop_requested is not None:
            self._stop(run, closing=False)

    def _stop(self, run: _Run, closing: bool) -> None:
        run.stopping, run.closing = True, closing
        # Supervisor.stop waits up to the grace period; the loop must keep polling meanwhile.
        threading.Thread(target=run.sup.stop, args=(self.grace,), name=f"fluxgym-stop-{run.job_id}",
                         daemon=True).start()

    def _stop_all(self) -> None:
        with self._mutex:
            runs = [r for r in self._runs.values() if not r.stopping]
        for run in runs:
            self._stop(run, closing=True)

    def _shutdown(self) -> None:
        self._stop_all()
        with self._mutex:
            runs = list(self._runs.values())
        for run in runs:
            if run.thread is not None:
                run.thread.join()
            self._finish(run)
        if self._runs and self.store_error is None:  # outcomes the store would not take (still locked)
            self.store_error = StoreLockedError(
                f"could not record how jobs {sorted(self._runs)} ended: the job store {self.store.path} stayed "
                "locked; the next worker start settles them from their output folders", self.store.path)
        if self.store is not None:
            self.store.close()
        self._lock.release()

    # ------------------------------------------------------------ events -> store

    def _on_event(self, run: _Run, ev: dict) -> None:
        with self._mutex:
            self._guard(self._apply_event, run, ev)

    def _apply_event(self, run: _Run, ev: dict) -> None:
        kind, job_id = ev.get("event"), run.job_id
        if kind == "step":
            run.pending.update(_progress_fields(ev))
            self._flush(run, force=False)
            return
        self._flush(run, force=True)  # keep the order: progress before the state change it led to
        job = self.store.get(job_id)
        if job is None:
            return
        if kind == "started":
            rec = run.sup.process
            fields = {"pid": rec.pid if rec else ev.get("pid"), "pgid": rec.pgid if rec else None,
                      "create_time": rec.create_time if rec else None, "phase": "loading"}
            if job.state in ("stalled", "recovering"):
                self.store.transition(job_id, "running", why=f"attempt {ev.get('attempt')} started", **fields)
            else:
                self.store.update(job_id, **fields)
        elif kind == "phase":
            self.store.update(job_id, phase=ev.get("phase"), **({"step": ev["step"]} if ev.get("step") else {}))
        elif kind == "checkpoint":
            self.store.update(job_id, last_checkpoint=ev.get("path"), last_checkpoint_step=ev.get("step"))
        elif kind == "stall":
            if job.state in ("running", "recovering"):
                self.store.transition(job_id, "stalled", why=f"no progress for {ev.get('idle_s')} s in "
                                      f"{ev.get('phase')}", phase=ev.get("phase"))
        elif kind == "restart":
            reason = {"reason": ev.get("reason"), "detail": ev.get("detail"), "at_step": job.step,
                      "time": ev.get("time", time.time())}
            fields = {"restarts": job.restarts + 1, "restart_reasons": job.restart_reasons + [reason],
                      "pid": None, "pgid": None, "create_time": None}
            if ev.get("blocks_to_swap") is not None:
                fields["blocks_to_swap"] = ev["blocks_to_swap"]
            if job.state in ("running", "stalled"):
                self.store.transition(job_id, "recovering", why=f"restart: {ev.get('reason')}", **fields)
            else:
                self.store.update(job_id, **fields)
        elif kind == "oom_retry":
            self.store.update(job_id, blocks_to_swap=ev.get("blocks_to_swap"))

    def _flush(self, run: _Run, force: bool) -> None:
        if not run.pending or (not force and time.monotonic() - run.last_flush < PROGRESS_INTERVAL):
            return
        fields, run.pending = run.pending, {}
        run.last_flush = time.monotonic()
        self._guard(self.store.update, run.job_id, **fields)

    # ------------------------------------------------------------ outcome -> store

    def _finish(self, run: _Run) -> None:
        with self._mutex:
            if run.job_id not in self._runs:
                return
            self._flush(run, force=True)
            state = self._guard(self._record_outcome, run)
            if state is None and self.store_error is None:
                return  # the store is locked for now: the next tick records it
            del self._runs[run.job_id]  # recorded, or the store is unusable (the next start reconciles it)
            if state is not None:
                self.ran[run.job_id] = state

    def _record_outcome(self, run: _Run) -> str:
        job = self.store.get(run.job_id)
        if job is None:
            return "failed"
        out = run.outcome
        if run.crash is not None or out is None:
            return self._end(job, "failed", error=f"the supervisor failed: {run.crash!r}", hint=None)
        progress = {k: getattr(out, k) for k in ("step", "total_steps", "epoch") if getattr(out, k) is not None}
        if out.last_checkpoint:
            progress["last_checkpoint"] = str(out.last_checkpoint)
        if out.state == "done":
            return self._end(job, "done", lora_file=str(out.lora_file) if out.lora_file else None, phase="done",
                             **progress)
        if out.state == "stopped" and not job.stop_requested and run.closing:
            self._end(job, "interrupted", phase=None, resume_from="auto", **progress)
            return "interrupted"
        if out.state == "stopped":
            return self._end(job, "stopped", phase=None, **progress)
        tail = list(getattr(out, "tail", None) or log_tail(Path(job.log_file), 40))
        lines = [ln[:300] for ln in tail if any(w in ln.lower() for w in _ERROR_WORDS)]
        return self._end(job, "failed", error=out.error, hint=out.hint, error_lines=lines[-10:], phase="failed",
                         **progress)

    def _end(self, job: Job, state: str, **fields) -> str:
        if job.state != state:
            self.store.transition(job.id, state, why="run ended", pid=None, pgid=None, create_time=None, **fields)
        log.info("job %s (%s): %s%s", job.id, job.lora, state,
                 f": {fields['error']}" if fields.get("error") else "")
        return state


def _swap_in(argv: list[str]) -> int | None:
    value = None
    for i, tok in enumerate(argv[:-1]):
        if tok == "--blocks_to_swap":
            value = argv[i + 1]
    return int(value) if value is not None and str(value).isdigit() else None
