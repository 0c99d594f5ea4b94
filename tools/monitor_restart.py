"""Restart commands for tools/training_monitor.py: what to relaunch, with which --resume.

- `with_resume`: COMMAND with earlier `--resume` arguments removed and the chosen state folder appended.
- `command_from_script`: the argv a training script runs, without ever editing the script.
- `find_newest_state`: the shared validator's newest complete state folder (stdlib only).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path


def with_resume(cmd: list[str], state_dir: Path | str | None) -> list[str]:
    """COMMAND with any earlier `--resume X` / `--resume=X` removed and `--resume state_dir` appended."""
    if state_dir is None:
        return list(cmd)
    out, skip = [], False
    for arg in cmd:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            out.append(arg)
    return out + ["--resume", str(state_dir)]


def command_from_script(path: Path) -> list[str]:
    """The argv a training script runs, without editing it: `bash script` when it forwards "$@",
    else its training command line (continuations joined) parsed with shlex."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if '"$@"' in text or "$*" in text:
        return ["bash", str(path)]
    joined = re.sub(r"[\\^][ \t]*\r?\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("#", "REM ", "::"))]
    picked = [ln for ln in lines if "train_network.py" in ln] or lines
    if not picked:
        raise ValueError(f"--train-script {path}: no command line found in it")
    return shlex.split(picked[-1])


def find_newest_state(output_dir: Path, output_name: str | None):
    """The shared validator's choice (manifest checksums, or upstream files intact); None when there is none."""
    from library.checkpoint_validation import newest_valid_state

    return newest_valid_state(Path(output_dir), output_name)
