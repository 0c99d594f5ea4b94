"""A queue of three demo jobs through a worker killed with SIGKILL in the middle of one, with the real trainer.

The three LoRAs train on the same images with the same settings, so the two uninterrupted ones are the
reference for the interrupted one: its final LoRA must be torch.equal to theirs, and no job may run twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fluxgym.cli import main
from fluxgym.demo import TRIGGER, ensure_tiny_models, write_demo_images
from fluxgym.generate import DEFAULT_TRAINER, REPO_ROOT
from fluxgym.jobs import JobStore
from fluxgym.naming import project_paths
from fluxgym.prepare import prepare_dataset
from fluxgym.status import checkpoint_validation
from fluxgym.supervise import read_events

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEFAULT_TRAINER.is_file(), reason=f"the trainer {DEFAULT_TRAINER} is not there"),
]
NAMES = ("Alpha", "Beta", "Gamma")
SETTINGS = ["--vram", "cpu", "--base-model", "demo", "--trigger", TRIGGER, "--resolution", "64", "--epochs", "2",
            "--save-every", "1", "--repeats", "1", "--workers", "0", "--launcher", "python"]


def _worker(root, log_path):
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fluxgym", "worker", "--until-idle", "--root", str(root)],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_first_state(store, job_id, state_dir, final, timeout=600.0):
    """Poll the files (not the store, which lags a check interval): the epoch-1 state folder is complete."""
    validate = checkpoint_validation().validate_state_dir
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state_dir.is_dir() and validate(state_dir).valid:
            return
        job = store.get(job_id)
        assert job.state not in ("done", "failed"), f"job {job_id} ended before its first checkpoint"
        assert not final.exists()
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {state_dir} within {timeout} s")


def test_queue_of_three_demo_jobs_survives_a_worker_killed_mid_run(root, tmp_path, tiny_models):
    (root / "models").symlink_to(tiny_models["unet"].parents[1])  # the session's tiny models: the demo layout
    ensure_tiny_models(root)  # finds them present; builds nothing
    src = tmp_path / "shapes"
    src.mkdir()
    write_demo_images(src, n=4)
    paths = {}
    for name in NAMES:
        paths[name] = project_paths(root, name)
        prepare_dataset(src, paths[name].dataset_dir, trigger=TRIGGER, resolution=64)
        assert main(["queue", "add", name, *SETTINGS, "--root", str(root)]) == 0
    store = JobStore.open(root)
    ids = {j.lora: j.id for j in store.list()}
    beta = paths["Beta"]
    log_path = tmp_path / "worker.log"

    first = _worker(root, log_path)
    try:
        _wait_for_first_state(store, ids["beta"], beta.out("beta-000001-state"), beta.final_lora)
        os.kill(first.pid, signal.SIGKILL)  # the worker dies mid-run, the way a crash ends it
    finally:
        first.kill()
        first.wait()
    assert not beta.final_lora.exists(), "the kill came after Beta had finished: nothing was tested"
    assert store.get(ids["alpha"]).state == "done" and store.get(ids["gamma"]).state == "queued"
    assert store.get(ids["beta"]).state == "running"  # what the dead worker left behind

    second = _worker(root, log_path)
    assert second.wait(timeout=600) == 0, log_path.read_text()[-3000:]

    jobs = {j.lora: j for j in store.list()}
    assert {j.state for j in jobs.values()} == {"done"}, log_path.read_text()[-3000:]
    reference = load_file(str(paths["Alpha"].final_lora))
    for lora in ("beta", "gamma"):
        assert jobs[lora].lora_file == str(project_paths(root, lora).final_lora)
        got = load_file(jobs[lora].lora_file)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), f"{lora} differs from alpha"
    for j in jobs.values():  # progress made it into the store
        assert (j.step, j.total_steps, j.epoch) == (8, 8, 2), j
        assert j.last_checkpoint and j.started and j.finished and j.error is None
    for lora in ("alpha", "gamma"):  # nothing ran twice
        assert [h[1] for h in store.history(jobs[lora].id)].count("running") == 1
        started = [e for e in read_events(jobs[lora].events_file)[0] if e["event"] == "started"]
        assert len(started) == 1
    b = jobs["beta"]
    assert b.restarts >= 1 and b.restart_reasons, b
    beta_started = [e for e in read_events(b.events_file)[0] if e["event"] == "started"]
    assert len(beta_started) == 2  # the original launch and one resume, never a second copy alongside
    assert any("--resume" in e["argv"] for e in beta_started[1:])
    print(f"beta: restarts {b.restarts}, reasons {[r['reason'] for r in b.restart_reasons]}")
