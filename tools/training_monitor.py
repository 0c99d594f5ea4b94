#!/usr/bin/env python3
"""Watch a FLUX LoRA training run by its progress, end it cleanly when it is stuck, and resume it.

A thin command line over the project's one run supervisor (fluxgym/supervise/), the same code that
`python -m fluxgym train` and the job worker use:
- Supervise (`... -- COMMAND`): start COMMAND in its own process group, its output appended to train.log.
- Attach (no COMMAND): watch a run started elsewhere through the pid in heartbeat.json.
- Phase-aware deadlines, stall report + whole-tree kill, and with --auto-resume a relaunch with
  `--resume <newest valid state>` (more --blocks_to_swap after out of memory), capped and guarded
  against no-progress loops. Events also go to OUTPUT_DIR/events.jsonl.
Stdlib + psutil only: it must start fast and never depend on the (possibly broken) training stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # entry script: the repository root, once; fluxgym._paths does the rest
    sys.path.insert(0, _REPO)

import psutil  # noqa: E402

from fluxgym.supervise import Deadlines, ProcessRecord, RestartPolicy, RunSpec, Supervisor  # noqa: E402,F401
from fluxgym.supervise.options import add_deadline_flags, deadlines_from  # noqa: E402
from fluxgym.supervise.policy import command_from_script, with_resume  # noqa: E402,F401 (re-exported)
from fluxgym.supervise.progress import read_heartbeat  # noqa: E402

logger = logging.getLogger("training_monitor")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GAVE_UP, EXIT_STALLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 124, 130
_LEVELS = {"stall": logging.ERROR, "failed": logging.ERROR, "gave_up": logging.ERROR, "kill_failed": logging.ERROR,
           "launch_failed": logging.ERROR, "usage": logging.ERROR, "restart": logging.WARNING,
           "oom_retry": logging.WARNING, "crawl": logging.WARNING, "no_state": logging.WARNING,
           "leftovers": logging.WARNING, "finished_unclean": logging.WARNING, "step": logging.DEBUG}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training_monitor.py",
        description="Supervise (-- COMMAND ...) or attach to a training run; detect stalls by progress, not GPU load.",
        epilog="exit codes: 0 finished, 2 usage, 3 gave up after restarts, 124 stalled (no --auto-resume), "
        "127 the command could not start, 130 interrupted, otherwise the trainer's own exit code",
    )
    p.add_argument("--output-dir", type=Path, required=True, help="the run's output folder (heartbeat, states)")
    p.add_argument("--output-name", default=None, help="only consider state folders of this output name")
    p.add_argument("--auto-resume", action="store_true", help="after a stall or crash, relaunch with --resume")
    add_deadline_flags(p, restart_cap=True)
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
    try:
        deadlines_from(args)
    except ValueError as exc:
        raise SystemExit(f"training_monitor.py: error: {exc}") from None
    if not command and args.auto_resume and args.train_script is None:
        raise SystemExit("training_monitor.py: error: attach mode with --auto-resume needs --train-script PATH")
    if args.train_script is not None and not args.train_script.is_file():
        raise SystemExit(f"training_monitor.py: error: --train-script {args.train_script} does not exist")
    return args


class Monitor:
    """Maps the supervisor's events and outcome onto this tool's log, --json lines and exit codes."""

    def __init__(self, args: argparse.Namespace, *, echo=None, find_state: Callable | None = None):
        self.args = args
        argv = list(args.command) or (command_from_script(args.train_script) if args.train_script else [])
        spec = RunSpec(argv=argv, cwd=Path.cwd(), output_dir=args.output_dir, output_name=args.output_name)
        self.supervisor = Supervisor(
            spec, deadlines=deadlines_from(args), policy=RestartPolicy(auto_resume=args.auto_resume,
                                                                        max_restarts=args.max_restarts),
            on_event=self.show, echo=echo, check_interval=args.check_interval, kill_grace=args.kill_grace,
            dump_wait=args.dump_wait, find_state=find_state)

    def show(self, event: dict) -> None:
        logger.log(_LEVELS.get(event["event"], logging.INFO), event.get("message", event["event"]))
        if self.args.json:
            print(json.dumps(event, default=str), flush=True)

    def event(self, kind: str, message: str, **fields) -> None:
        self.show({"event": kind, "time": time.time(), "message": message, **fields})

    def run(self) -> int:
        if self.args.command:
            out = self.supervisor.run()
        else:
            rec = self._attach_target()
            if rec is None:
                return EXIT_USAGE
            out = self.supervisor.attach(rec)
        if out.state == "done":
            self.event("finished", "training finished (exit code 0)")
            return EXIT_OK
        if out.ended_by == "finished_unclean":
            self.event("finished_unclean", out.error)
            return EXIT_OK if out.stalled else out.exit_code or EXIT_FAILED
        if out.state == "stopped":
            logger.error("interrupted: the training process tree was ended")
            return EXIT_INTERRUPTED
        if out.ended_by == "gave_up":
            self.event("gave_up", out.error, restarts=len(out.restarts))
            return EXIT_GAVE_UP
        if out.ended_by == "launch_failed":
            return 127
        if out.ended_by == "stall":
            return EXIT_STALLED
        return out.exit_code or EXIT_FAILED

    def _attach_target(self) -> ProcessRecord | None:
        hb = read_heartbeat(self.args.output_dir)
        pid = self.args.pid or (hb or {}).get("pid")
        problem = _attach_problem(pid, hb, explicit=self.args.pid is not None)
        if problem:
            self.event("usage", f"attach: {problem}; give -- COMMAND to supervise instead, or --pid")
            return None
        # Its group is signalled only when the trainer leads it; otherwise it may be a UI's or a shell's group.
        return ProcessRecord.of(pid, own_group=False)


def _attach_problem(pid, hb: dict | None, *, explicit: bool) -> str:
    """Why `pid` must not be watched (and later killed) as this run's trainer; "" when it may."""
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return f"no running trainer (heartbeat.json says pid {pid!r})"
    if explicit or hb is None:
        return ""
    if hb.get("phase") in ("done", "failed", "stopped"):
        return f"the run in heartbeat.json already ended (phase {hb['phase']})"
    try:
        born = psutil.Process(pid).create_time()
    except psutil.Error:
        return f"pid {pid} is gone"
    if isinstance(hb.get("time"), (int, float)) and born > hb["time"] + 1.0:
        return f"pid {pid} started after the last heartbeat: it is another process that reused the number"
    return ""


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


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # the supervisor answers it by ending the whole training tree


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
        old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Monitor(args, echo=echo, find_state=find_state).run()
    except KeyboardInterrupt:
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
