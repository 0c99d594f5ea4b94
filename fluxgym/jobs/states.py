"""Job states and the one table of allowed transitions between them.

`JobStore.transition` is the only code that changes a job's state, and it asks `check_transition`
first; anything not in `TRANSITIONS` is a bug in the caller and raises `IllegalTransition`.
"""

from __future__ import annotations

JOB_STATES = ("queued", "running", "stalled", "recovering", "done", "failed", "stopped", "interrupted")
# A process may exist for these (the worker watches it); a second job of the same LoRA must wait.
ACTIVE_STATES = ("running", "stalled", "recovering")
FINISHED_STATES = ("done", "failed", "stopped", "interrupted")

# old state -> the states it may move to, each with the event that causes it.
TRANSITIONS: dict[str, dict[str, str]] = {
    "queued": {
        "running": "the worker launched it",
        "stopped": "cancelled before it started",
        "failed": "it could not be launched (script or models missing)",
    },
    "running": {
        "stalled": "no progress within the phase deadline",
        "recovering": "the supervisor restarts it (stall, out of memory, crash)",
        "done": "finished and the final LoRA exists",
        "failed": "ended without a LoRA and no restart left",
        "stopped": "cancelled",
        "interrupted": "the worker or the machine went away while it ran",
    },
    "stalled": {
        "running": "progress came back before the tree was ended",
        "recovering": "the tree was ended and a restart begins",
        "done": "progress came back and it finished",
        "failed": "stalled with no restart left",
        "stopped": "cancelled",
        "interrupted": "the worker or the machine went away while it ran",
    },
    "recovering": {
        "running": "the restarted process is up",
        "stalled": "the restarted process made no progress",
        "done": "finished during the restart bookkeeping",
        "failed": "the restart cap or the no-progress guard gave up",
        "stopped": "cancelled",
        "interrupted": "the worker or the machine went away while it ran",
    },
    "done": {},
    "failed": {"queued": "retry or resume"},
    "stopped": {"queued": "retry or resume"},
    "interrupted": {
        "queued": "recovery re-queues it to resume from its newest valid checkpoint",
        "stopped": "cancelled while waiting for recovery",
    },
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the code that asked for it."""


def check_transition(job_id: int, old: str, new: str) -> None:
    if new not in JOB_STATES:
        raise IllegalTransition(f"job {job_id}: {new!r} is not a job state (states: {', '.join(JOB_STATES)})")
    if new not in TRANSITIONS.get(old, {}):
        allowed = ", ".join(TRANSITIONS.get(old, {})) or "nothing (final)"
        raise IllegalTransition(f"job {job_id}: {old} -> {new} is not allowed; from {old}: {allowed}")
