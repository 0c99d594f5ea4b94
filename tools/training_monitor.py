#!/usr/bin/env python3
"""Watch a FLUX LoRA training run by its progress, end it cleanly when it is stuck, and resume it.

- Supervise (`... -- COMMAND`): start COMMAND in its own process group, drain its output into train.log.
- Attach (no COMMAND): watch a run started elsewhere through the pid in heartbeat.json.
- Phase-aware deadlines (monitor_progress), stall report + whole-tree kill (monitor_process), and with
  --auto-resume a relaunch with `--resume <newest valid state>`, capped and guarded against no-progress loops.
Stdlib + psutil only: it must start fast and never depend on the (possibly broken) training stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent / "sd-scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import psutil  # noqa: E402

from monitor_process import (  # noqa: E402
    LogTail, OutputDrain, ProcessTree, gpu_snapshot, py_spy_dump, request_stack_dump, write_stall_report,
)
from monitor_progress import Deadlines, ProgressTracker, Stall, read_heartbeat  # noqa: E402
from monitor_restart import command_from_script, find_newest_state, with_resume  # noqa: E402

logger = logging.getLogger("training_monitor")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GAVE_UP, EXIT_STALLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 124, 130
PHASE_HINTS = {
    "loading": "model loading or the silent hashing of the base model; check disk speed and free RAM",
    "caching_latents": "latent caching; check the dataset disk and the VAE device",
    "caching_text": "text-encoder caching; T5 on CPU is slow, check free RAM",
    "training": "a training step; check the GPU (nvidia-smi) and read the Python stacks above",
    "saving": "writing a checkpoint; check free space and the output disk",
    "sampling": "sample image generation; use fewer sample steps or sample less often",
}


class _Interrupted(Exception):
    pass


@dataclass
class Outcome:
    kind: str  # "exit", "stall" or "usage"
    rc: int
    progressed: bool = False
    step: int | None = None
    phase: str = ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training_monitor.py",
        description="Supervise (-- COMMAND ...) or attach to a training run; detect stalls by progress, not GPU load.",
        epilog="exit codes: 0 finished, 2 usage, 3 gave up after restarts, 124 stalled (no --auto-resume), "
        "130 interrupted, otherwise the trainer's own exit code",
    )
    p.add_argument("--output-dir", type=Path, required=True, help="the run's output folder (heartbeat, states)")
    p.add_argument("--output-name", default=None, help="only consider state folders of this output name")
    p.add_argument("--auto-resume", action="store_true", help="after a stall or crash, relaunch with --resume")
    p.add_argument("--max-restarts", type=int, default=3, help="restart cap (default 3)")
    p.add_argument("--stuck-threshold", type=float, default=300.0,
                   help="minimum seconds a training step may take (default 300); the deadline is "
                   "max(this, 5 x p99 of observed step times)")
    p.add_argument("--first-step-timeout", type=float, default=600.0,
                   help="step deadline until the first step of each launch is done (default 600)")
    p.add_argument("--loading-timeout", type=float, default=1800.0, help="model loading (default 1800)")
    p.add_argument("--caching-timeout", type=float, default=1800.0, help="latent/text caching (default 1800)")
    p.add_argument("--save-timeout", type=float, default=900.0, help="checkpoint saving (default 900)")
    p.add_argument("--sample-timeout", type=float, default=900.0, help="sample generation (default 900)")
    p.add_argument("--check-interval", type=float, default=5.0, help="seconds between checks (default 5)")
    p.add_argument("--kill-grace", type=float, default=30.0, help="seconds between TERM and KILL (default 30)")
    p.add_argument("--dump-wait", type=float, default=10.0, help="seconds to wait for a stack dump (default 10)")
    p.add_argument("--train-script", type=Path, default=None, help="attach mode: script to relaunch on restart")
    p.add_argument("--pid", type=int, default=None, help="attach mode: trainer pid (default: from heartbeat.json)")
    p.add_argument("--json", action="store_true", help="print one JSON event per line on stdout")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        cut = argv.index("--")
        opts, command = argv[:cut], argv[cut + 1:]
        if not command:
            raise SystemExit("training_monitor.py: error: nothing after '--'; give the training command")
    else:
        opts, command = argv, []
    args = build_parser().parse_args(opts)
    args.command = command
    if args.check_interval <= 0 or args.max_restarts < 0:
        raise SystemExit("training_monitor.py: error: --check-interval must be > 0 and --max-restarts >= 0")
    if not command and args.auto_resume and args.train_script is None:
        raise SystemExit("training_monitor.py: error: attach mode with --auto-resume needs --train-script PATH")
    if args.train_script is not None and not args.train_script.is_file():
        raise SystemExit(f"training_monitor.py: error: --train-script {args.train_script} does not exist")
    return args


class Monitor:
    def __init__(self, args: argparse.Namespace, *, echo=None, find_state: Callable | None = None):
        self.args = args
        self.dir: Path = args.output_dir
        self.echo = echo
        self.find_state = find_state or find_newest_state
        self.deadlines = Deadlines(
            loading=args.loading_timeout, caching=args.caching_timeout, saving=args.save_timeout,
            sampling=args.sample_timeout, stuck_threshold=args.stuck_threshold, first_step=args.first_step_timeout,
        )
        self.launches: list[list[str]] = []
        self._last_reported: tuple[int | None, float] = (None, float("-inf"))

    def event(self, kind: str, message: str, level: int = logging.INFO, **fields) -> None:
        logger.log(level, message)
        if self.args.json:
            print(json.dumps({"event": kind, "time": time.time(), "message": message, **fields}), flush=True)

    # -- the restart loop ----------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        cmd = list(a.command) or None
        restarts = no_progress = 0
        resume_step = 0
        while True:
            outcome = self._supervise(cmd, resume_step) if cmd else self._attach()
            if outcome.kind == "usage":
                return EXIT_USAGE
            if outcome.kind == "launch_failed":  # a wrong command line: restarting cannot help
                return outcome.rc
            if outcome.kind == "exit" and outcome.rc == 0:
                self.event("finished", "training finished (exit code 0)")
                return EXIT_OK
            what = "stalled" if outcome.kind == "stall" else f"exited with code {outcome.rc}"
            if outcome.phase == "done":  # the final model was saved: a restart would only redo finished work
                self.event("finished_unclean", f"the trainer saved its final model but then {what}; not restarting",
                           logging.WARNING)
                return EXIT_OK if outcome.kind == "stall" else outcome.rc
            if not a.auto_resume:
                self.event("failed", f"training {what}; not restarting (no --auto-resume)", logging.ERROR)
                return EXIT_STALLED if outcome.kind == "stall" else outcome.rc or EXIT_FAILED
            if restarts > 0:
                no_progress = 0 if outcome.progressed else no_progress + 1
            if no_progress >= 2:
                self.event("gave_up", f"training {what}; two restarts in a row did not get past step {resume_step}; "
                           "stopping (see the stall reports and train.log)", logging.ERROR, restarts=restarts)
                return EXIT_GAVE_UP
            if restarts >= a.max_restarts:
                self.event("gave_up", f"training {what}; restart cap reached ({a.max_restarts}); stopping",
                           logging.ERROR, restarts=restarts)
                return EXIT_GAVE_UP
            cmd, resume_step = self._restart_command(cmd)
            restarts += 1
            self.event("restart", f"restart {restarts}/{a.max_restarts}: {shlex.join(cmd)}", logging.WARNING,
                       restart=restarts, argv=cmd, resume_step=resume_step)

    def _restart_command(self, cmd: list[str] | None) -> tuple[list[str], int]:
        base = cmd if cmd else command_from_script(self.args.train_script)
        state = self.find_state(self.dir, self.args.output_name)
        if state is None:
            self.event("no_state", "no valid state folder found; restarting from the beginning", logging.WARNING)
            return list(base), 0
        return with_resume(base, state.path), int(state.step or 0)

    # -- one launch ----------------------------------------------------------------------------
    def _supervise(self, cmd: list[str], resume_step: int) -> Outcome:
        self.dir.mkdir(parents=True, exist_ok=True)
        tracker = ProgressTracker(self.dir, self.deadlines, resume_step=resume_step)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("COLUMNS", "200")  # rich wraps log lines at 80 columns in a pipe, splitting markers
        with open(self.dir / "train.log", "ab") as fh:
            fh.write(f"\n===== training_monitor launch {len(self.launches) + 1} at {time.ctime()}: "
                     f"{shlex.join(cmd)}\n".encode())
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, bufsize=0, **_own_group_kwargs())
        except OSError as exc:
            self.event("launch_failed", f"could not start {cmd[0]!r}: {exc}", logging.ERROR)
            return Outcome("launch_failed", 127)
        self.launches.append(list(cmd))
        drain = OutputDrain(proc.stdout, self.dir / "train.log", tracker.feed, self.echo)
        tree = ProcessTree(proc.pid, own_group=True)
        self.event("started", f"started pid {proc.pid}: {shlex.join(cmd)}", pid=proc.pid, argv=cmd)
        try:
            return self._watch(tracker, tree, proc=proc, drain=drain)
        except BaseException:
            tree.terminate(self.args.kill_grace)  # never leave a training run behind us
            raise
        finally:
            if drain.join(5.0):
                proc.stdout.close()

    def _attach(self) -> Outcome:
        hb = read_heartbeat(self.dir)
        pid = self.args.pid or (hb or {}).get("pid")
        problem = _attach_problem(pid, hb, explicit=self.args.pid is not None)
        if problem:
            self.event("usage", f"attach: {problem}; give -- COMMAND to supervise instead, or --pid",
                       logging.ERROR)
            return Outcome("usage", EXIT_USAGE)
        start_step = int((hb or {}).get("step") or 0)
        tracker = ProgressTracker(self.dir, self.deadlines, started_wall=0.0, resume_step=start_step)
        tracker.adopt_heartbeat()
        tail = LogTail(self.dir / "train.log", tracker.feed)
        # Only signal the whole group when the trainer leads it; otherwise it may be a UI's or a shell's group.
        tree = ProcessTree(pid, own_group=hasattr(os, "getpgid") and os.getpgid(pid) == pid)
        self.event("attached", f"attached to pid {pid} in {self.dir}", pid=pid)
        return self._watch(tracker, tree, tail=tail)

    def _watch(self, tracker: ProgressTracker, tree: ProcessTree, *, proc=None, drain=None, tail=None) -> Outcome:
        phase = None
        while True:
            rc = proc.poll() if proc is not None else None
            if proc is None and tree.root_pid not in {p.pid for p in tree.alive()}:
                hb = read_heartbeat(self.dir) or {}
                rc = EXIT_OK if hb.get("phase") == "done" else EXIT_FAILED
            if rc is not None:
                return self._exited(rc, tracker, tree, drain)
            if tail is not None:
                tail.poll()
            tree.refresh()
            for ev in tracker.poll():
                self.event(ev.pop("event"), ev.pop("message"), logging.WARNING, **ev)
            if tracker.phase != phase:
                phase = tracker.phase
                self.event("phase", f"phase: {phase} (step {tracker.step})", phase=phase, step=tracker.step)
            self._progress_event(tracker)
            stall = tracker.check()
            if stall is not None:
                self._on_stall(stall, tracker, tree, (drain or tail).tail.lines(200))
                self._kill(tree)
                if proc is not None:
                    try:
                        proc.wait(5.0)
                    except subprocess.TimeoutExpired:
                        pass  # reported by _kill as kill_failed
                return Outcome("stall", EXIT_STALLED, tracker.advanced(), tracker.step, stall.phase)
            time.sleep(self.args.check_interval)

    def _progress_event(self, tracker: ProgressTracker) -> None:
        """For UIs (--json): the step, at most every 10 s; the log file stays quiet."""
        now = time.monotonic()
        if not self.args.json or tracker.step == self._last_reported[0] or now - self._last_reported[1] < 10.0:
            return
        self._last_reported = (tracker.step, now)
        hb = tracker.heartbeat or {}
        total = hb.get("total_steps") or tracker.parser.state.total
        self.event("progress", f"step {tracker.step}/{total}", logging.DEBUG, phase=tracker.phase,
                   step=tracker.step, total_steps=total, epoch=hb.get("epoch", tracker.parser.state.epoch))

    def _exited(self, rc: int, tracker: ProgressTracker, tree: ProcessTree, drain) -> Outcome:
        leftovers = [p.pid for p in tree.alive() if p.pid != tree.root_pid]
        if leftovers:
            self.event("leftovers", f"trainer exited but left processes {leftovers}; ending them", logging.WARNING)
            self._kill(tree)
        if drain is not None:
            drain.join(5.0)
        tracker.poll()
        self.event("exited", f"trainer exited with code {rc} at step {tracker.step}", rc=rc, step=tracker.step)
        return Outcome("exit", rc, tracker.advanced(), tracker.step, tracker.phase)

    def _on_stall(self, stall: Stall, tracker: ProgressTracker, tree: ProcessTree, lines: list[str]) -> None:
        self.event("stall", f"STALL: {stall.describe()}", logging.ERROR, phase=stall.phase, step=stall.step,
                   idle_s=round(stall.idle_s, 1), deadline_s=stall.deadline_s)
        hb = tracker.heartbeat
        pid = hb.get("pid") if hb else None
        stacks = "(no heartbeat.json from our trainer: upstream sd-scripts has no on-demand stack dump)"
        if isinstance(pid, int) and pid in {p.pid for p in tree.alive()}:
            if _status(pid) == psutil.STATUS_STOPPED:
                stacks = f"(pid {pid} is stopped (state T, e.g. SIGSTOP or Ctrl-Z): it cannot dump its stacks)"
            else:
                stacks = request_stack_dump(pid, self.dir, self.args.dump_wait)
        else:
            stacks = py_spy_dump([p.pid for p in tree.alive()]) or stacks
        summary = [
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"verdict: {stall.describe()} (progress source: {stall.source})",
            f"phase: {stall.phase}  step: {stall.step}  epoch: {(hb or {}).get('epoch', tracker.parser.state.epoch)}",
            f"likely area: {PHASE_HINTS.get(stall.phase, 'unknown phase')}",
            f"heartbeat: {json.dumps(hb) if hb else '(none)'}",
            f"command: {shlex.join(self.launches[-1]) if self.launches else '(attached)'}",
        ]
        path = write_stall_report(self.dir, summary=summary, tree=tree.describe(), stacks=stacks, log_lines=lines,
                                  gpu=gpu_snapshot())
        self.event("report", f"stall report: {path}", path=str(path))

    def _kill(self, tree: ProcessTree) -> None:
        pids = sorted(p.pid for p in tree.alive())
        self.event("killing", f"ending process tree {pids} (TERM, {self.args.kill_grace:g} s, KILL)", pids=pids)
        survivors = tree.terminate(self.args.kill_grace)
        if survivors:
            self.event("kill_failed", f"processes {survivors} survived KILL (uninterruptible I/O?)", logging.ERROR,
                       pids=survivors)
        else:
            self.event("killed", f"all {len(pids)} processes are gone", pids=pids)


def _attach_problem(pid, hb: dict | None, *, explicit: bool) -> str:
    """Why `pid` must not be watched (and later killed) as this run's trainer; "" when it may."""
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return f"no running trainer (heartbeat.json says pid {pid!r})"
    if explicit or hb is None:
        return ""
    if hb.get("phase") in ("done", "failed"):
        return f"the run in heartbeat.json already ended (phase {hb['phase']})"
    try:
        born = psutil.Process(pid).create_time()
    except psutil.Error:
        return f"pid {pid} is gone"
    if isinstance(hb.get("time"), (int, float)) and born > hb["time"] + 1.0:
        return f"pid {pid} started after the last heartbeat: it is another process that reused the number"
    return ""


def _own_group_kwargs() -> dict:
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def _status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "gone"


def _setup_logging(output_dir: Path) -> list[logging.Handler]:
    output_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(output_dir / "training_monitor.log"),
                                       logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handlers


def main(argv: list[str] | None = None, *, echo=None, find_state: Callable | None = None) -> int:
    """CLI entry. `echo` (a binary stream) receives the trainer's output; default stdout unless --json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return EXIT_USAGE
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if echo is None and not args.json:
        echo = sys.stdout.buffer
    handlers = _setup_logging(args.output_dir)
    old_term = None
    if threading.current_thread() is threading.main_thread():  # signal handlers only work there
        def _on_term(signum, frame):
            raise _Interrupted()
        old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        return Monitor(args, echo=echo, find_state=find_state).run()
    except (KeyboardInterrupt, _Interrupted):
        logger.error("interrupted: the training process tree was ended")
        return EXIT_INTERRUPTED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        for h in handlers:
            logger.removeHandler(h)
            h.close()


if __name__ == "__main__":
    sys.exit(main())
