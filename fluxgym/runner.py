"""Supervised training runs: launch, drain, judge, stop.

`run_training` starts the generated script in its own process group, drains its output continuously
into `outputs/<slug>/train.log` (and the console) so a full pipe can never stall the trainer, and
reports success only when the exit code is 0 AND this run wrote `<slug>.safetensors`. Ctrl-C and
`stop_run` end the whole tree. `last_run.json` records the verdict for `status`.
"""

from __future__ import annotations

import codecs
import collections
import json
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fluxgym.models import ModelError
from fluxgym.naming import ProjectPaths
from fluxgym.proctree import describe_exit, leader_alive, popen_kwargs, read_pid_file, stop_tree, write_pid_file

log = logging.getLogger(__name__)

PID_FILE = "train.pid"
LOG_FILE = "train.log"
LAST_RUN = "last_run.json"
STOP_MARKER = ".stop-requested"
TAIL_LINES = 200
_ERROR_RE = re.compile(r"error|exception|traceback|hang guard|killed|out of memory|not supported", re.I)


class RunError(RuntimeError):
    """The run could not be started (script missing, model files missing, already running)."""


@dataclass
class RunResult:
    success: bool
    exit_code: int
    lora: Path | None
    log_file: Path
    stopped: bool = False
    leftovers: list[int] = field(default_factory=list)
    summary: str = ""


class _Drain(threading.Thread):
    """Copies the child's output to the log (bytes) and the console (text), keeping the last lines."""

    def __init__(self, stream, log_path: Path, echo: TextIO | None):
        super().__init__(name="fluxgym-drain", daemon=True)
        self.stream, self.log_path, self.echo = stream, log_path, echo
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def run(self) -> None:
        fd = self.stream.fileno()
        with open(self.log_path, "ab") as log_f:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                log_f.write(chunk)
                log_f.flush()  # the log on disk is what `status` and a crashed UI rely on
                self._text(self._decoder.decode(chunk))
            self._text(self._decoder.decode(b"", final=True) + "\n")

    def _text(self, text: str) -> None:
        if self.echo is not None:
            try:
                self.echo.write(text)
                self.echo.flush()
            except (OSError, ValueError):
                self.echo = None  # a closed console must not stop the draining
        parts = re.split(r"[\r\n]", self._pending + text)
        self._pending = parts[-1][-4096:]
        self.tail.extend(p for p in parts[:-1] if p.strip())


def launch_command(paths: ProjectPaths) -> list[str]:
    if os.name == "nt":
        return ["cmd", "/d", "/c", str(paths.out("train.bat"))]
    return ["bash", str(paths.out("train.sh"))]


def check_before_launch(paths: ProjectPaths) -> None:
    """Everything that must hold before a launch, each failure one clear message."""
    script = paths.out("train.bat" if os.name == "nt" else "train.sh")
    if not script.is_file():
        raise RunError(f"{script} not found; run `python -m fluxgym generate {paths.slug} --vram ...` first")
    info = read_pid_file(paths.out(PID_FILE))
    if info and leader_alive(info):
        raise RunError(f"'{paths.slug}' is already training (pid {info['pid']}); see `python -m fluxgym status "
                       f"{paths.slug}` or stop it with `python -m fluxgym stop {paths.slug}`")
    try:
        run_info = json.loads(paths.out("run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a hand-written script: the trainer checks its own inputs
    missing = [p for p in run_info.get("model_files", {}).values() if not Path(p).exists()]
    if missing:
        fetch = run_info.get("fetch", {})
        hint = "python -m fluxgym models download KEY"
        lines = [f"  - {p}\n      get it with: {fetch.get(p, hint)}" for p in missing]
        raise ModelError("missing model files:\n" + "\n".join(lines))


def _summary(paths: ProjectPaths, code: int, lora_ok: bool, stopped: bool, tail: list[str]) -> str:
    if code == 0 and lora_ok:
        return f"training finished: {paths.final_lora}"
    if stopped:
        head = f"training stopped ({describe_exit(code)})"
    elif code == 0:
        head = f"training FAILED: the trainer exited with code 0 but did not write {paths.final_lora}"
    else:
        head = f"training FAILED: {describe_exit(code)}"
    tail = [line if len(line) <= 300 else line[:297] + "..." for line in tail]  # argv dumps can be huge
    errors = [line for line in tail if _ERROR_RE.search(line)][-10:]
    last = tail[-15:]
    parts = [head, f"log: {paths.out(LOG_FILE)}"]
    if errors:
        parts += ["error lines:"] + [f"  {e}" for e in errors]
    parts += ["last lines:"] + [f"  {e}" for e in last]
    if not stopped:
        parts.append(f"to continue from the newest checkpoint: python -m fluxgym resume {paths.slug}")
    return "\n".join(parts)


def _wait(proc: subprocess.Popen, info: dict, grace: float, echo: TextIO | None) -> tuple[int, bool]:
    """Wait for the trainer; Ctrl-C ends the whole tree. Returns (exit code, interrupted)."""
    try:
        while True:
            try:
                return proc.wait(timeout=0.5), False
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        if echo is not None:
            echo.write(f"\nCtrl-C: stopping the training process tree (grace {grace:g} s)...\n")
        stop_tree(info, grace=grace)
        return proc.wait(), True


def _finish_drain(drain: _Drain, info: dict) -> list[int]:
    """Join the drain; a leftover process still holding the pipe is ours to end."""
    drain.join(timeout=5.0)
    if not drain.is_alive():
        return []
    left = stop_tree(info, grace=2.0)
    drain.join(timeout=5.0)
    return left


def run_training(paths: ProjectPaths, extra_args: list[str] | tuple[str, ...] = (), *,
                 echo: TextIO | None = None, grace: float = 10.0, env: dict | None = None) -> RunResult:
    """Run the generated script to the end and judge the result (see module docstring)."""
    check_before_launch(paths)
    log_path = paths.out(LOG_FILE)
    paths.out(STOP_MARKER).unlink(missing_ok=True)
    started = time.time()
    with open(log_path, "ab") as f:
        f.write(f"\n===== fluxgym run started {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
    proc = subprocess.Popen(launch_command(paths) + list(extra_args), cwd=paths.root, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            **popen_kwargs())
    info = write_pid_file(paths.out(PID_FILE), proc.pid)
    drain = _Drain(proc.stdout, log_path, echo)
    drain.start()
    try:
        code, interrupted = _wait(proc, info, grace, echo)
        leftovers = _finish_drain(drain, info)
    finally:
        if (read_pid_file(paths.out(PID_FILE)) or {}).get("pid") == proc.pid:
            paths.out(PID_FILE).unlink(missing_ok=True)
    stopped = interrupted or paths.out(STOP_MARKER).exists()
    lora = paths.final_lora
    # Only a file this run wrote counts: an old LoRA from an earlier run must not turn a crash into success.
    lora_ok = lora.is_file() and lora.stat().st_size > 0 and lora.stat().st_mtime >= started - 1.0
    success = code == 0 and lora_ok and not stopped
    result = RunResult(success, code, lora if lora_ok else None, log_path, stopped, leftovers,
                       _summary(paths, code, lora_ok, stopped, list(drain.tail)))
    record = {"success": success, "exit_code": code, "stopped": stopped, "started": started,
              "finished": time.time(), "lora": str(lora) if lora_ok else None, "extra_args": list(extra_args)}
    tmp = paths.out(f".{LAST_RUN}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, paths.out(LAST_RUN))
    return result


def stop_run(paths: ProjectPaths, *, grace: float = 10.0) -> tuple[bool, list[int]]:
    """End a run started by `train`/`resume` (any terminal). Returns (was running, pids still alive)."""
    info = read_pid_file(paths.out(PID_FILE))
    if info is None:
        return False, []
    paths.out(STOP_MARKER).write_text(str(time.time()), encoding="utf-8")
    running = leader_alive(info)
    left = stop_tree(info, grace=grace)
    if not left:
        paths.out(PID_FILE).unlink(missing_ok=True)
    return running, left
