"""Every process agrees on the run before the first step; the console says how the work is split.

Each process resolves the run id and the resume step from the output folder on its own (preflight). If the
processes see different folders (two machines, each with its own `--output_dir`), they would train from
different points and write corrupted checkpoints; one collective before training catches that and fails
with both values named. The main process records the run (fluxtrain-runs.json) in its preflight; after a barrier the
others read it here.
"""
from __future__ import annotations

import os

from library.errors import ResumeError
from library.run_identity import read_run
from library.train_session import RunControl, TrainSession


def describe_world(session: TrainSession) -> str:
    world = session.world
    if world == 1:
        return "processes: 1 (no distributed backend); every batch is trained here"
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "none"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    machines = max(1, world // max(1, local))
    return (f"processes: {world} on {machines} machine(s), backend {backend}; each optimizer step trains one batch "
            f"per process (process r takes batches r, r+{world}, ... of each epoch) and averages the gradients")


def agree_on_run(session: TrainSession, control: RunControl) -> None:
    """All processes continue the same run from the same step, or every process raises ResumeError."""
    s = session.settings
    # The main process recorded the run in its preflight, before it joined the process group; this barrier
    # makes that hold for every backend and launcher (NCCL and torchrun's store do not wait for it).
    control.barrier("waiting for the main process to record the run")
    if not session.is_main:
        session.run = read_run(s.save.output_dir, s.save.output_name, s.args_digest())
    if session.is_main:
        print(describe_world(session), flush=True)
    if session.world == 1:
        return
    import torch.distributed as dist

    mine = {"rank": session.rank, "run_id": session.run.run_id if session.run else None,
            "token": session.run.token if session.run else None, "settings_hash": s.args_digest(),
            "resume_step": session.resume.step if session.resume else 0,
            "resume_from": str(session.resume.path) if session.resume else None}
    gathered: list = [None] * session.world
    with control.ddp_deadline("checking that every process continues the same run"):
        dist.all_gather_object(gathered, mine)
    check_agreement(gathered)


def _describe(view: dict) -> str:
    run = f"run {view['run_id']}" if view["run_id"] is not None else "no recorded run"
    where = f"resumes at step {view['resume_step']} from {view['resume_from']}" if view["resume_from"] else \
        "starts at step 0"
    return f"rank {view['rank']} {where}, {run} (token {view['token']}, settings {view['settings_hash'][:12]})"


def check_agreement(views: list[dict]) -> None:
    first = views[0]
    keys = ("run_id", "token", "settings_hash", "resume_step")
    for view in views[1:]:
        differ = [k for k in keys if view[k] != first[k]]
        if differ:
            raise ResumeError(
                f"the processes disagree before the first step ({', '.join(differ)}): {_describe(first)}; "
                f"{_describe(view)}. Every process must see the same --output_dir (one shared folder on every "
                "machine) and the same flags; nothing was trained.")
