"""`python -m fluxgym train|resume|stop` for one LoRA: checks before launch, then the run supervisor.

`run_training` checks the generated script and model files, then hands `outputs/<slug>/train.sh` to the
one supervisor (fluxgym/supervise/): the trainer writes train.log itself (so it outlives its supervisor),
stall detection and auto-resume on by default, events in events.jsonl. Success only when the trainer exits 0
AND this run wrote `<slug>.safetensors`. `last_run.json` records the verdict; `stop_run` ends a run from any terminal.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fluxgym.models import ModelError
from fluxgym.naming import ProjectPaths
from fluxgym.supervise import Deadlines, RestartPolicy, RunOutcome, RunSpec, Supervisor
from fluxgym.supervise.outcome import error_lines
from fluxgym.supervise.process import PID_FILE, running
from fluxgym.supervise.process import stop_run as _stop_supervised

LOG_FILE = "train.log"
LAST_RUN = "last_run.json"
EVENTS_FILE = "events.jsonl"
__all__ = ["EVENTS_FILE", "LAST_RUN", "LOG_FILE", "PID_FILE", "RunError", "RunResult", "run_training", "stop_run"]


class RunError(RuntimeError):
    """The run could not be started (script missing, model files missing, already running)."""


@dataclass
class RunResult:
    success: bool
    exit_code: int | None
    lora: Path | None
    log_file: Path
    stopped: bool = False
    leftovers: list[int] = field(default_factory=list)
    summary: str = ""
    outcome: RunOutcome | None = None


def launch_command(paths: ProjectPaths) -> list[str]:
    if os.name == "nt":
        return ["cmd", "/d", "/c", str(paths.out("train.bat"))]
    return ["bash", str(paths.out("train.sh"))]


def check_before_launch(paths: ProjectPaths) -> None:
    """Everything that must hold before a launch, each failure one clear message."""
    script = paths.out("train.bat" if os.name == "nt" else "train.sh")
    if not script.is_file():
        raise RunError(f"{script} not found; run `python -m fluxgym generate {paths.slug} --vram ...` first")
    info = running(paths.output_dir)
    if info is not None:
        raise RunError(f"'{paths.slug}' is already training (pid {info.get('pid') or info['supervisor']['pid']}); "
                       f"see `python -m fluxgym status {paths.slug}` or stop it with "
                       f"`python -m fluxgym stop {paths.slug}`")
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


def run_spec(paths: ProjectPaths, extra_args: list[str] | tuple[str, ...] = (), *,
             env: dict | None = None, job_id: int | None = None) -> RunSpec:
    """The supervisor's view of this LoRA's generated script (the job worker builds the same)."""
    return RunSpec(argv=launch_command(paths) + list(extra_args), cwd=paths.root, output_dir=paths.output_dir,
                   output_name=paths.slug, env=env, log_path=paths.out(LOG_FILE), events_path=paths.out(EVENTS_FILE),
                   job_id=job_id, resume_command=f"python -m fluxgym resume {paths.slug}")


def summary(paths: ProjectPaths, out: RunOutcome) -> str:
    if out.state == "done":
        return f"training finished: {out.lora_file}"
    head = "training stopped" if out.state == "stopped" else f"training FAILED: {out.error}"
    parts = [head, f"log: {paths.out(LOG_FILE)}"]
    if out.restarts:
        parts.append("restarts: " + "; ".join(r["reason"] + (f" at step {r['at_step']}" if r["at_step"] else "") +
                                              (f" (blocks_to_swap {r['blocks_to_swap']})" if r["reason"] == "oom"
                                               else "") for r in out.restarts))
    errors = error_lines(out.tail)
    if errors and out.state != "stopped":
        parts += ["error lines:"] + [f"  {e}" for e in errors]
    if out.tail:
        parts += ["last lines:"] + [f"  {e if len(e) <= 300 else e[:297] + '...'}" for e in out.tail[-15:]]
    if out.hint:
        parts.append(out.hint)
    return "\n".join(parts)


def run_training(paths: ProjectPaths, extra_args: list[str] | tuple[str, ...] = (), *,
                 echo: TextIO | None = None, grace: float = 10.0, env: dict | None = None,
                 deadlines: Deadlines | None = None, policy: RestartPolicy | None = None,
                 check_interval: float = 2.0) -> RunResult:
    """Run the generated script under the supervisor to the end and judge the result."""
    check_before_launch(paths)
    started = time.time()
    sup = Supervisor(run_spec(paths, extra_args, env=env), deadlines=deadlines, policy=policy, echo=echo,
                     kill_grace=grace, check_interval=check_interval)
    out = sup.run()
    success = out.state == "done" and out.lora_file is not None
    result = RunResult(success, out.exit_code, out.lora_file, paths.out(LOG_FILE), out.state == "stopped", [],
                       summary(paths, out), out)
    record = {"success": success, "state": out.state, "exit_code": out.exit_code, "stopped": result.stopped,
              "started": started, "finished": time.time(), "lora": str(out.lora_file) if success else None,
              "extra_args": list(extra_args), "restarts": out.restarts, "error": out.error, "hint": out.hint}
    tmp = paths.out(f".{LAST_RUN}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, paths.out(LAST_RUN))
    return result


def stop_run(paths: ProjectPaths, *, grace: float = 10.0) -> tuple[bool, list[int]]:
    """End a run started by `train`/`resume` (any terminal). Returns (was running, pids still alive)."""
    return _stop_supervised(paths.output_dir, grace=grace)
