"""What a supervised run ended as, in plain words: `RunOutcome`, its first error line and its hint.

The hint says how to continue only when continuing can help (a stall, a crash, a kill, out of memory);
bad input, a folder in use or a command that cannot start get what to fix instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fluxgym.supervise.policy import ExitKind

_ERROR_LINE = re.compile(r"^(error:|[A-Za-z_.]*(Error|Exception)\b|HANG GUARD|Killed\b|CUDA out of memory)")
_ERROR_ANYWHERE = re.compile(r"error|exception|hang guard|killed|out of memory|not supported", re.I)


@dataclass
class RunOutcome:
    state: str  # "done" | "failed" | "stopped"
    exit_code: int | None
    lora_file: Path | None  # only when done AND the final LoRA exists and was written by this run
    restarts: list[dict] = field(default_factory=list)
    error: str | None = None  # the first error line, plain words
    hint: str | None = None  # what to do (resume only when a resume can fix it)
    last_checkpoint: str | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    # Beyond the contract (engine.md): how it ended, for the monitor's exit codes, and the last output lines.
    # finished | finished_unclean | no_lora | stall | exit | gave_up | oom | fatal | launch_failed | usage | stopped
    ended_by: str = ""
    tail: list[str] = field(default_factory=list)
    stalled: bool = False  # the last launch was ended by the stall detector

    @property
    def resumable(self) -> bool:
        return self.ended_by in ("stall", "exit", "gave_up", "oom", "stopped")


def first_error_line(lines: list[str]) -> str | None:
    """The line that best says what went wrong: the last exception line of the output, else any line
    that mentions an error; shortened (argv dumps can be huge)."""
    found = [ln.strip() for ln in lines if _ERROR_LINE.match(ln.strip())]
    # The trainer's own `error:` / HANG GUARD line says what to fix; `accelerate launch` follows it with its
    # CalledProcessError (a dump of the whole argv) for every failing exit, which says nothing.
    own = [ln for ln in found if ln.startswith(("error:", "HANG GUARD"))]
    found = own or [ln for ln in found if not ln.startswith("subprocess.CalledProcessError")] or found
    found = found or [ln.strip() for ln in lines if _ERROR_ANYWHERE.search(ln)]
    if not found:
        return None
    line = found[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def error_lines(lines: list[str], n: int = 10) -> list[str]:
    short = [ln if len(ln) <= 300 else ln[:297] + "..." for ln in lines]
    return [ln for ln in short if _ERROR_ANYWHERE.search(ln)][-n:]


def resume_hint(resume_command: str | None) -> str:
    if resume_command:
        return f"to continue from the newest checkpoint: {resume_command}"
    return ("to continue from the newest checkpoint, run the same command with --resume <state folder> "
            "(python tools/find_checkpoint.py OUTPUT_DIR names it)")


def hint_for(ended_by: str, kind: ExitKind | None, resume_command: str | None, **detail) -> str | None:
    if ended_by == "fatal" and kind is not None and kind.detail == "output folder in use":
        return ("another trainer is using this output folder: wait for it to end or stop it "
                "(a resume now would be refused the same way)")
    if ended_by == "fatal":
        return ("fix the flag or file named in the error above, then start the run again "
                "(resuming cannot fix bad input)")
    if ended_by == "launch_failed":
        return f"check the command: {detail.get('program')!r} could not be started"
    if ended_by == "no_lora":
        return f"the trainer ended without writing {detail.get('lora')}; read the log above for why"
    if ended_by == "finished_unclean":
        return None
    if ended_by == "oom" and detail.get("more") is not None:
        return (f"add --blocks_to_swap {detail['more']} to the command (it saves GPU memory and does not change "
                f"the result), then {resume_hint(resume_command)[3:]}")
    if ended_by == "oom":
        return (f"the GPU ran out of memory even with --blocks_to_swap {detail.get('blocks')}: lower the resolution "
                f"or the batch size (or pick a smaller VRAM preset), then {resume_hint(resume_command)[3:]}")
    return resume_hint(resume_command)
