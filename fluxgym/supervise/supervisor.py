"""The run supervisor: launch (or adopt) a training run, watch it, end it when stuck, resume it, report.

`Supervisor.run()` loops launch -> watch -> verdict -> maybe relaunch with `--resume <newest valid state>`
(and more `--blocks_to_swap` after an out-of-memory death) until the run is done, has failed for good or
was stopped. Everything it sees goes to events.jsonl (see events.py) and the on_event callback.
Used by `python -m fluxgym train|resume`, tools/training_monitor.py and the job worker.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from fluxgym.supervise.drain import LogFollower, open_log
from fluxgym.supervise.events import EventLog
from fluxgym.supervise.outcome import RunOutcome, first_error_line, hint_for
from fluxgym.supervise.policy import (
    FLUX_MAX_BLOCKS_TO_SWAP, ExitKind, RestartPolicy, blocks_to_swap_in, classify_exit, find_newest_state,
    next_blocks_to_swap, with_blocks_to_swap, with_resume,
)
from fluxgym.supervise.process import (
    PID_FILE, STOP_MARKER, ProcessRecord, ProcessTree, describe_exit, launch, process_alive, read_pid_file,
    stop_tree, write_pid_file,
)
from fluxgym.supervise.progress import Deadlines, ProgressTracker, Stall
from fluxgym.supervise.report import stall_report

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunSpec:
    argv: list[str]  # e.g. ["bash", "/abs/outputs/x/train.sh"]; restarts append "--resume PATH"
    cwd: Path
    output_dir: Path  # heartbeat.json, state folders, train.log
    output_name: str | None = None
    env: dict[str, str] | None = None  # extra variables (CUDA_VISIBLE_DEVICES=...)
    log_path: Path | None = None  # default output_dir / "train.log"
    events_path: Path | None = None  # default output_dir / "events.jsonl"
    job_id: int | None = None  # copied into every event
    blocks_to_swap: int | None = None  # current value (for the OOM ladder); None: read from argv/script
    max_blocks_to_swap: int | None = None  # ladder top; None: FLUX.1's (35)
    resume_command: str | None = None  # beyond the contract: how a user continues, for the hint


@dataclass
class _Launch:
    """How one launch ended."""

    kind: str  # "exit", "stall", "launch_failed", "stopped", "usage"
    rc: int | None
    progressed: bool = False
    step: int | None = None
    phase: str = ""
    lines: tuple[str, ...] = ()
    stall: Stall | None = None
    by: str = ""  # for "stopped": "user" or "signal"


class Supervisor:
    def __init__(self, spec: RunSpec, *, deadlines: Deadlines | None = None, policy: RestartPolicy | None = None,
                 on_event: Callable[[dict], None] | None = None, echo: TextIO | None = None,
                 check_interval: float = 2.0, kill_grace: float = 10.0, dump_wait: float = 10.0,
                 find_state: Callable | None = None):
        self.spec = spec
        self.deadlines = deadlines or Deadlines()
        self.policy = policy or RestartPolicy()
        self.echo = echo
        self.check_interval, self.kill_grace, self.dump_wait = check_interval, kill_grace, dump_wait
        self.find_state = find_state or find_newest_state
        self.log_path = spec.log_path or spec.output_dir / "train.log"
        self.events = EventLog(spec.events_path or spec.output_dir / "events.jsonl", job_id=spec.job_id,
                               on_event=on_event)
        self._process: ProcessRecord | None = None
        self._stop = threading.Event()
        self._started_wall = self._lora_since = time.time()
        self._last: dict = {}

    # -- public ------------------------------------------------------------------------------------
    @property
    def process(self) -> ProcessRecord | None:
        """The current launch (None between launches)."""
        return self._process

    def stop(self, grace: float = 10.0) -> None:
        """From any thread: end the whole tree; run() then returns state "stopped"."""
        self.kill_grace = grace
        self._stop.set()
        rec = self._process
        if rec is not None:
            stop_tree(rec, grace)

    def run(self, resume: str | None = None) -> RunOutcome:
        argv = with_resume(list(self.spec.argv), resume) if resume else list(self.spec.argv)
        return self._loop(argv, attach=None)

    def attach(self, rec: ProcessRecord) -> RunOutcome:
        """Adopt a live run (follows train.log from its end, and the heartbeats); restarts relaunch spec.argv."""
        return self._loop(list(self.spec.argv), attach=rec)

    # -- the restart loop --------------------------------------------------------------------------
    def emit(self, kind: str, message: str, **fields) -> dict:
        return self.events.emit(kind, message=message, **fields)

    def _loop(self, argv: list[str], attach: ProcessRecord | None) -> RunOutcome:
        spec = self.spec
        self.events.new_run()
        self._started_wall = time.time()
        # A final LoRA counts as this run's when written after it began: for an adopted run, when its process
        # started (it may have saved the LoRA before we re-attached), never the moment of re-attaching.
        born = attach.create_time if attach is not None else None
        self._lora_since = born if born is not None else self._started_wall
        self._checkpoints: set[str] = set()
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        (spec.output_dir / STOP_MARKER).unlink(missing_ok=True)
        blocks = spec.blocks_to_swap if spec.blocks_to_swap is not None else blocks_to_swap_in(argv)
        top = spec.max_blocks_to_swap if spec.max_blocks_to_swap is not None else FLUX_MAX_BLOCKS_TO_SWAP
        restarts: list[dict] = []
        counted = no_progress = resume_step = 0
        tried = [blocks or 0]
        try:
            while True:
                attempt = len(restarts) + 1
                res = self._watch_attached(attach) if attach is not None and attempt == 1 else \
                    self._launch_once(argv, attempt, resume_step)
                verdict = self._verdict(res, argv)
                if verdict is not None:
                    return self._finish(verdict, res, restarts, blocks, tried)
                kind = classify_exit(res.rc, list(res.lines)) if res.kind == "exit" else None
                reason = "stall" if res.kind == "stall" else ("oom" if kind and kind.kind == "oom" else "crash")
                what = f"stalled ({res.stall.describe()})" if res.stall else f"exited with {describe_exit(res.rc)}"
                if reason == "oom":
                    new = next_blocks_to_swap(blocks, top, self.policy.oom_step) if self.policy.auto_resume else None
                    if new is None:
                        return self._finish(("failed", "oom"), res, restarts, blocks, tried, kind=kind, top=top)
                    self.emit("oom_retry", f"out of GPU memory ({kind.detail}); retrying with --blocks_to_swap {new} "
                              f"(was {blocks or 0}; other settings unchanged)", blocks_to_swap=new, previous=blocks)
                    blocks = new
                    tried.append(new)
                else:
                    if not self.policy.auto_resume:
                        return self._finish(("failed", "stall" if res.stall else "exit"), res, restarts, blocks,
                                            tried, kind=kind, what=f"training {what}; not restarting (auto-resume off)")
                    if counted > 0:
                        no_progress = 0 if res.progressed else no_progress + 1
                    if no_progress >= self.policy.no_progress_limit:
                        return self._finish(("failed", "gave_up"), res, restarts, blocks, tried, kind=kind, what=(
                            f"training {what}; {no_progress} restarts in a row did not get past step {resume_step}; "
                            "stopping (see the stall reports and train.log)"))
                    if counted >= self.policy.max_restarts:
                        return self._finish(("failed", "gave_up"), res, restarts, blocks, tried, kind=kind, what=(
                            f"training {what}; restart cap reached ({self.policy.max_restarts}); stopping"))
                    counted += 1
                if self._stop.is_set() or self._stop_marker():
                    return self._finish(("stopped", "stopped"), res, restarts, blocks, tried)
                if not argv:  # adopted with no command to relaunch
                    return self._finish(("failed", "stall" if res.stall else "exit"), res, restarts, blocks, tried,
                                        kind=kind, what=f"training {what}; no command to restart it with")
                argv, resume_step = self._restart_argv(argv, blocks if reason == "oom" else None)
                restarts.append({"reason": reason, "detail": what if reason != "oom" else kind.detail,
                                 "at_step": res.step, "blocks_to_swap": blocks, "time": time.time()})
                self.emit("restart", f"restart {len(restarts)} ({reason}): {shlex.join(argv)}", reason=reason,
                          detail=restarts[-1]["detail"], attempt=len(restarts) + 1, argv=argv, restart=len(restarts),
                          resume_step=resume_step, blocks_to_swap=blocks)
        except KeyboardInterrupt:  # Ctrl-C or a signal the CLI turned into one; the tree is already ended
            res = _Launch("stopped", None, lines=(), by="signal")
            return self._finish(("stopped", "stopped"), res, restarts, blocks, tried)
        finally:
            self._process = None
            data = read_pid_file(spec.output_dir / PID_FILE) or {}
            if (data.get("supervisor") or {}).get("pid") == os.getpid():
                (spec.output_dir / PID_FILE).unlink(missing_ok=True)

    def _verdict(self, res: _Launch, argv: list[str]) -> tuple[str, str] | None:
        """A final (state, ended_by), or None when the policy decides about a restart."""
        if res.kind == "stopped":
            return ("stopped", "stopped")
        if res.kind in ("launch_failed", "usage"):
            return ("failed", res.kind)
        if self._final_saved(res):
            if res.kind == "exit" and res.rc == 0:
                return ("done", "finished") if self._lora_ok() or not self.spec.output_name else ("failed", "no_lora")
            return ("failed", "finished_unclean")  # a restart would only redo finished work
        if self._stop.is_set() or self._stop_marker():  # ended on request: whatever it exited with, no restart
            return ("stopped", "stopped")
        if res.kind == "exit":
            if res.rc == 0:
                return ("done", "finished") if not self.spec.output_name else ("failed", "no_lora")
            if res.by == "signal":
                return ("stopped", "stopped")
            if classify_exit(res.rc, list(res.lines)).kind == "fatal":
                return ("failed", "fatal")
        return None

    def _final_saved(self, res: _Launch) -> bool:
        phase = res.stall.phase if res.stall else res.phase
        return phase == "done" or (bool(self.spec.output_name) and self._lora_ok())

    def _lora_path(self) -> Path | None:
        name = self.spec.output_name
        return self.spec.output_dir / f"{name}.safetensors" if name else None

    def _lora_ok(self) -> bool:
        """The final LoRA exists and this run wrote it (an old file must not turn a crash into success)."""
        path = self._lora_path()
        try:
            st = path.stat() if path else None
        except OSError:
            return False
        return st is not None and st.st_size > 0 and st.st_mtime >= self._lora_since - 1.0

    def _restart_argv(self, argv: list[str], blocks: int | None) -> tuple[list[str], int]:
        base = with_blocks_to_swap(argv, blocks) if blocks is not None else list(argv)
        try:
            state = self.find_state(self.spec.output_dir, self.spec.output_name)
        except Exception as exc:  # noqa: BLE001 - a broken validator must not hide the run's own failure
            log.warning("could not look for a state folder: %s", exc)
            state = None
        if state is None:
            self.emit("no_state", "no valid state folder found; restarting from the beginning")
            return base, 0
        return with_resume(base, state.path), int(state.step or 0)

    def _finish(self, verdict: tuple[str, str], res: _Launch, restarts: list[dict], blocks, tried,
                kind: ExitKind | None = None, top: int | None = None, what: str | None = None) -> RunOutcome:
        state, ended_by = verdict
        lines = list(res.lines)
        hb = self._last
        out = RunOutcome(state=state, exit_code=res.rc, lora_file=None, restarts=restarts, ended_by=ended_by,
                         tail=lines, last_checkpoint=hb.get("last_checkpoint"), step=res.step if res.step is not None
                         else hb.get("step"), total_steps=hb.get("total_steps"), epoch=hb.get("epoch"),
                         stalled=res.stall is not None)
        lora = self._lora_path()
        if state == "done":
            out.lora_file = lora if lora and self._lora_ok() else None
            # The trainer's run id: a later fresh start moves this file to runs/<id>/, and the job page follows it.
            run = _lora_run(out.lora_file) if out.lora_file else None
            self.emit("done", f"training finished: {out.lora_file or 'exit code 0'}", lora_file=out.lora_file,
                      trainer_run=run)
            return out
        if state == "stopped":
            out.hint = hint_for("stopped", None, self.spec.resume_command)
            by = res.by or ("user" if self._stop.is_set() or self._stop_marker() else "signal")
            self.emit("stopped", f"training stopped ({'on request' if by == 'user' else 'by a signal'})", by=by)
            return out
        if ended_by == "oom" and not self.policy.auto_resume:
            out.error = f"out of GPU memory at --blocks_to_swap {blocks or 0}; not restarting (auto-resume off)"
        elif ended_by == "oom":
            steps = " -> ".join(str(b) for b in tried)
            out.error = (f"out of GPU memory at --blocks_to_swap {blocks or 0} (tried {steps}; the top for this "
                         f"model is {top}): {kind.detail if kind else ''}").rstrip(": ")
        elif ended_by == "no_lora":
            out.error = f"the trainer exited with code 0 but did not write {lora}"
        elif ended_by == "finished_unclean":
            how = "stalled" if res.stall else f"exited with {describe_exit(res.rc)}"
            out.error = f"the trainer saved its final model but then {how}; not restarting"
        elif res.stall is not None:
            out.error = f"stalled: {res.stall.describe()}"
        else:
            out.error = first_error_line(lines) or f"the trainer {describe_exit(res.rc)}"
        if what and ended_by in ("gave_up",):
            out.error = f"{what}; last error: {out.error}"
        out.hint = hint_for(ended_by, kind or (classify_exit(res.rc, lines) if res.kind == "exit" else None),
                            self.spec.resume_command, program=(self.spec.argv or ["?"])[0], lora=lora, blocks=blocks,
                            more=next_blocks_to_swap(blocks, top, self.policy.oom_step) if top else None)
        self.emit("failed", what or out.error, error=out.error, exit_code=res.rc, hint=out.hint, ended_by=ended_by)
        return out

    def _stop_marker(self) -> bool:
        try:
            return (self.spec.output_dir / STOP_MARKER).stat().st_mtime >= self._started_wall - 1.0
        except OSError:
            return False

    # -- one launch --------------------------------------------------------------------------------
    def _launch_once(self, argv: list[str], attempt: int, resume_step: int) -> _Launch:
        spec = self.spec
        tracker = ProgressTracker(spec.output_dir, self.deadlines, resume_step=resume_step)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("COLUMNS", "200")  # rich wraps log lines at 80 columns when not on a tty, splitting markers
        env.update(spec.env or {})
        header = f"\n===== fluxgym supervisor launch {attempt} at {time.ctime()}: {shlex.join(argv)}\n"
        try:
            log_file, start = open_log(self.log_path, header)
        except OSError as exc:
            self.emit("launch_failed", f"cannot open the run's log {self.log_path}: {exc}")
            return _Launch("launch_failed", 127, lines=(f"error: cannot open {self.log_path}: {exc} (check the "
                                                        "output folder's permissions and free space)",))
        try:
            with log_file:  # the child has its own copy of the descriptor
                proc, rec = launch(argv, cwd=spec.cwd, env=env, output=log_file)
        except OSError as exc:
            self.emit("launch_failed", f"could not start {argv[0]!r}: {exc}")
            return _Launch("launch_failed", 127, lines=(f"error: could not start {argv[0]!r}: {exc}",))
        self._process = rec
        write_pid_file(spec.output_dir / PID_FILE, rec, argv=argv, attempt=attempt)
        tree = ProcessTree(rec)
        follower = LogFollower(self.log_path, tracker.feed, self.echo, start=start)
        self.emit("started", f"started pid {proc.pid}: {shlex.join(argv)}", pid=proc.pid, argv=argv, attempt=attempt)
        try:
            return self._watch(tracker, tree, follower, proc=proc)
        except BaseException:
            tree.terminate(self.kill_grace)  # never leave a training run behind us
            raise
        finally:
            follower.finish(5.0)
            self._process = None

    def _watch_attached(self, rec: ProcessRecord) -> _Launch:
        tracker = ProgressTracker(self.spec.output_dir, self.deadlines, started_wall=0.0)
        tracker.adopt_heartbeat()
        tracker.resume_step = int((tracker.heartbeat or {}).get("step") or 0)
        follower = LogFollower(self.log_path, tracker.feed, self.echo)  # from the end: what it writes from now on
        self._process = rec
        tree = ProcessTree(rec)
        self.emit("attached", f"attached to pid {rec.pid} in {self.spec.output_dir}", pid=rec.pid)
        try:
            return self._watch(tracker, tree, follower)
        finally:
            follower.finish(5.0)

    def _watch(self, tracker: ProgressTracker, tree: ProcessTree, follower: LogFollower, *, proc=None) -> _Launch:
        seen = _Seen()
        while True:
            rc = proc.poll() if proc is not None else None
            if proc is None and not process_alive(tree.rec):  # adopted: no exit code, the heartbeat's word
                tracker.poll()
                rc = 0 if (tracker.heartbeat or {}).get("phase") == "done" else 1
            if rc is not None:
                return self._exited(rc, tracker, tree, follower)
            if self._stop.is_set() or self._stop_marker():
                self._kill(tree, quiet=True)
                return self._ended("stopped", proc, tracker, follower, by="user")
            tree.refresh()
            for ev in tracker.poll():
                self.emit(ev.pop("event"), ev.pop("message"), **ev)
            self._report_progress(tracker, seen)
            if tracker.phase == "stopped" and time.monotonic() - seen.phase_at > self.deadlines.saving:
                self._kill(tree, quiet=True)  # stopped by a signal but never exited: end it, it is no stall
                return self._ended("stopped", proc, tracker, follower, by="signal")
            stall = tracker.check()
            if stall is not None:
                self._on_stall(stall, tracker, tree, follower.tail.lines(200))
                self._kill(tree)
                res = self._ended("stall", proc, tracker, follower)
                res.stall = stall
                return res
            self._stop.wait(self.check_interval)

    def _ended(self, kind: str, proc, tracker: ProgressTracker, follower: LogFollower, by: str = "") -> _Launch:
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass  # reported by _kill as kill_failed
        follower.finish(5.0)  # the last lines it wrote before it was ended belong in the report
        self._last = dict(tracker.heartbeat or {})
        return _Launch(kind, rc, tracker.advanced(), tracker.step, tracker.phase, tuple(follower.tail.lines(200)),
                       by=by)

    def _exited(self, rc: int, tracker: ProgressTracker, tree: ProcessTree, follower: LogFollower) -> _Launch:
        tree.refresh(scan_group=True)  # children started since the last check are still in the group
        leftovers = [p.pid for p in tree.alive() if p.pid != tree.rec.pid]
        if leftovers:
            self.emit("leftovers", f"trainer exited but left processes {leftovers}; ending them", pids=leftovers)
            self._kill(tree)
        follower.finish(5.0)
        tracker.poll()
        self._last = dict(tracker.heartbeat or {})
        self.emit("exited", f"trainer exited with {describe_exit(rc)} at step {tracker.step}", rc=rc,
                  step=tracker.step)
        by = "signal" if tracker.phase == "stopped" else ""
        return _Launch("exit", rc, tracker.advanced(), tracker.step, tracker.phase, tuple(follower.tail.lines(200)),
                       by=by)

    # -- reporting ---------------------------------------------------------------------------------
    def _report_progress(self, tracker: ProgressTracker, seen: "_Seen") -> None:
        now = time.monotonic()
        phase, step = tracker.phase, tracker.step
        if phase != seen.phase:
            seen.phase, seen.phase_at = phase, now
            self.emit("phase", f"phase: {phase} (step {step})", phase=phase, step=step)
        hb = tracker.heartbeat or {}
        if step is not None and step != seen.step:
            if phase == "training":  # loading time before the first step is no step rate
                seen.rates.append((now, step))
            if now - seen.step_at >= 1.0:  # at most about one step event a second
                seen.step, seen.step_at = step, now
                total = tracker.total_steps
                rate = seen.rate()
                eta = round((total - step) / rate, 1) if rate and total else None
                self.emit("step", f"step {step}/{total}", step=step, total_steps=total, epoch=tracker.epoch,
                          loss=tracker.loss, it_per_s=round(rate, 4) if rate else None, eta_s=eta, phase=phase)
        ckpt = hb.get("last_checkpoint")
        if ckpt and ckpt not in self._checkpoints:
            self._checkpoints.add(ckpt)  # per run: a relaunch reading the last launch's heartbeat says nothing new
            if hb.get("time", 0) >= self._started_wall:
                self.emit("checkpoint", f"checkpoint saved: {ckpt}", path=ckpt,
                          step=_saved_step(ckpt, hb.get("step")))
        for path in seen.new_samples(self.spec.output_dir / "sample", self._started_wall):
            self.emit("sample", f"sample written: {path}", path=str(path), step=step)

    def _on_stall(self, stall: Stall, tracker: ProgressTracker, tree: ProcessTree, lines: list[str]) -> None:
        self.emit("stall", f"STALL: {stall.describe()}", phase=stall.phase, step=stall.step,
                  idle_s=round(stall.idle_s, 1), deadline_s=stall.deadline_s, rank=stall.rank)
        path = stall_report(self.spec.output_dir, stall, tracker, tree, lines, argv=self.spec.argv,
                            dump_wait=self.dump_wait)
        self.emit("report", f"stall report: {path}", path=str(path))

    def _kill(self, tree: ProcessTree, quiet: bool = False) -> None:
        pids = sorted(p.pid for p in tree.alive())
        if not quiet:
            self.emit("killing", f"ending process tree {pids} (TERM, {self.kill_grace:g} s, KILL)", pids=pids)
        survivors = tree.terminate(self.kill_grace)
        if survivors:
            self.emit("kill_failed", f"processes {survivors} survived KILL (uninterruptible I/O?)", pids=survivors)
        elif not quiet:
            self.emit("killed", f"all {len(pids)} processes are gone", pids=pids)


def _saved_step(checkpoint: str, fallback):
    """The step a state folder was saved at, from its manifest: the heartbeat has moved on by the time we read it."""
    try:
        step = json.loads((Path(checkpoint) / "checkpoint.json").read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return fallback
    return step if isinstance(step, int) else fallback


class _Seen:
    """What the watch loop already reported (one per launch)."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.phase_at = time.monotonic()
        self.step: int | None = None
        self.step_at = float("-inf")
        self.rates: deque[tuple[float, int]] = deque(maxlen=64)
        self.samples: set[str] = set()

    def rate(self) -> float | None:
        """Steps per second over the last ~30 s of observed steps."""
        pts = [p for p in self.rates if p[0] >= self.rates[-1][0] - 30.0]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def new_samples(self, folder: Path, since: float) -> list[Path]:
        try:
            entries = [e for e in os.scandir(folder) if e.is_file() and e.name not in self.samples]
        except OSError:
            return []
        fresh = []
        for e in entries:
            self.samples.add(e.name)
            try:
                if e.stat().st_mtime >= since - 1.0 and not e.name.startswith("."):
                    fresh.append(Path(e.path))
            except OSError:
                continue
        return sorted(fresh)


def _lora_run(path) -> int | None:
    from fluxgym.status import checkpoint_validation

    return checkpoint_validation().lora_run_id(Path(path))
