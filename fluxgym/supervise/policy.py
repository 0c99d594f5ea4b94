"""The one restart policy: what ended a launch, whether to start it again, and with which arguments.

- `classify_exit`: a finished run, an out-of-memory death, a failure a restart cannot fix (bad input,
  folder in use), or a crash.
- `RestartPolicy` + `next_blocks_to_swap`: auto-resume with a cap and a no-progress guard; the OOM ladder.
- `with_resume` / `with_blocks_to_swap`: the relaunch argv (earlier values removed, new ones appended:
  train.sh forwards "$@" and argparse keeps the last value), never an edit of the user's script.
- `command_from_script`, `find_newest_state`, `blocks_to_swap_in`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from fluxgym._paths import use_sd_scripts

use_sd_scripts()
from library.errors import EXIT_BAD_INPUT, EXIT_FOLDER_IN_USE  # noqa: E402

# FLUX.1 has 19 double + 38 single blocks. Upstream sd-scripts accepts at most 35 (it keeps two blocks of
# each kind resident for buffer reuse); ours only clamps to the model's counts. 35 is valid for both.
FLUX_MAX_BLOCKS_TO_SWAP = 35
OOM_PATTERNS = re.compile(r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|"
                          r"HIP out of memory|MPS backend out of memory")
# `accelerate launch` exits 1 whatever its worker returned, but says the worker's code.
_LAUNCHER_CODE = re.compile(r"returned non-zero exit status (\d+)")
_BAD_INPUT_CODES = {EXIT_BAD_INPUT: "bad input", EXIT_FOLDER_IN_USE: "output folder in use", 127: "cannot start"}


@dataclass
class RestartPolicy:
    auto_resume: bool = True
    max_restarts: int = 3
    no_progress_limit: int = 2  # restarts in a row that never pass the step they resumed from
    oom_step: int = 6  # blocks added per OOM retry


@dataclass(frozen=True)
class ExitKind:
    kind: str  # "ok", "oom", "fatal" (a restart cannot fix it), "crash"
    code: int | None  # the trainer's own code where the launcher hid it
    detail: str


def trainer_code(exit_code: int | None, lines: list[str]) -> int | None:
    """The trainer's exit code: the launcher's, or the worker's when `accelerate launch` reported it."""
    for line in reversed(lines[-50:]):
        m = _LAUNCHER_CODE.search(line)
        if m:
            return int(m.group(1))
    return exit_code


def classify_exit(exit_code: int | None, lines: list[str]) -> ExitKind:
    code = trainer_code(exit_code, lines)
    if exit_code == 0:
        return ExitKind("ok", 0, "exit code 0")
    oom = next((ln for ln in reversed(lines) if OOM_PATTERNS.search(ln)), None)
    if oom is not None:
        return ExitKind("oom", code, oom.strip()[:300])
    if code in _BAD_INPUT_CODES:
        return ExitKind("fatal", code, _BAD_INPUT_CODES[code])
    return ExitKind("crash", code, f"exit code {code}")


def next_blocks_to_swap(current: int | None, top: int | None, step: int) -> int | None:
    """The next rung of the OOM ladder, or None when the top is reached (or there is no ladder)."""
    if top is None or step <= 0:
        return None
    now = current or 0
    return None if now >= top else min(top, now + step)


def _without(cmd: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in cmd:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def with_resume(cmd: list[str], state_dir: Path | str | None) -> list[str]:
    """COMMAND with any earlier `--resume X` / `--resume=X` removed and `--resume state_dir` appended."""
    if state_dir is None:
        return list(cmd)
    return _without(cmd, "--resume") + ["--resume", str(state_dir)]


def with_blocks_to_swap(cmd: list[str], blocks: int | None) -> list[str]:
    """COMMAND with `--blocks_to_swap N` appended (earlier appended values removed)."""
    if blocks is None:
        return list(cmd)
    return _without(cmd, "--blocks_to_swap") + ["--blocks_to_swap", str(blocks)]


def blocks_to_swap_in(argv: list[str]) -> int | None:
    """The value the trainer will see: the last `--blocks_to_swap` in argv, else the one in the script
    argv runs (`bash train.sh`), else None. `--split_mode` alone means 18, as in the trainer."""
    script = None
    if len(argv) >= 2 and Path(argv[0]).name in ("bash", "sh"):
        script = argv[1]
    elif len(argv) >= 4 and Path(argv[0]).name in ("cmd", "cmd.exe"):
        script = argv[3]
    tokens = (_script_tokens(Path(script)) if script else []) + list(argv)
    value = None
    for i, tok in enumerate(tokens):
        if tok == "--blocks_to_swap" and i + 1 < len(tokens) and tokens[i + 1].isdigit():
            value = int(tokens[i + 1])
        elif tok.startswith("--blocks_to_swap=") and tok.split("=", 1)[1].isdigit():
            value = int(tok.split("=", 1)[1])
    if value is None and "--split_mode" in tokens:
        return 18
    return value


def _script_tokens(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    joined = re.sub(r"[\\^][ \t]*\r?\n", " ", text)
    try:
        return shlex.split(joined, comments=True)
    except ValueError:
        return joined.split()


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
