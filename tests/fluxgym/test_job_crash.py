"""A queue of three demo jobs through a worker killed with SIGKILL in the middle of one, with the real trainer.

The training outlives the worker (it writes train.log itself, no pipe to the dead worker): the restarted
worker adopts the same process (same pid and start time) and watches it to the end, so nothing restarts or
runs twice and no epoch is lost. The three LoRAs train on the same images with the same settings, so the two
uninterrupted ones are the reference for the interrupted one: its final LoRA must be torch.equal to theirs.
"""

from __future__ import annotations

import json
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
from fluxgym.supervise import ProcessRecord, process_alive, read_events
from library.console_markers import MODEL_SAVED

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


def _wait_for_event(path, kind, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(path)[0] if e["event"] == kind]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {kind!r} event in {path} within {timeout} s")


def test_queue_of_three_demo_jobs_survives_a_worker_killed_mid_run(root, tmp_path, tiny_models, capsys):
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
    job = store.get(ids["beta"])
    trainer = ProcessRecord(job.pid, job.pgid, job.create_time)
    frozen, second = False, None
    try:
        # Paused until the next worker has adopted it, so the adoption cannot race the run's end (pausing
        # changes no result); before the fix it was already dead here, killed by its broken output pipe.
        os.killpg(trainer.pgid, signal.SIGSTOP)
        frozen = True
        assert process_alive(trainer), "the training died with its worker"
        assert not beta.final_lora.exists(), "the kill came after Beta had finished: nothing was tested"
        assert store.get(ids["alpha"]).state == "done" and store.get(ids["gamma"]).state == "queued"
        assert job.state == "running"  # what the dead worker left behind

        second = _worker(root, log_path)
        attached = _wait_for_event(job.events_file, "attached")
        assert attached["pid"] == trainer.pid and process_alive(trainer)  # the same process, adopted
    except BaseException:
        if second is not None:
            second.kill()
        raise
    finally:
        if frozen:
            os.killpg(trainer.pgid, signal.SIGCONT)
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
    for lora in ("alpha", "beta", "gamma"):  # nothing ran twice, nothing was restarted or resumed
        j = jobs[lora]
        assert [h[1] for h in store.history(j.id)] == ["queued", "running", "done"], lora
        assert j.restarts == 0 and j.restart_reasons == [], j
        events = read_events(j.events_file)[0]
        started = [e for e in events if e["event"] == "started"]
        assert len(started) == 1 and "--resume" not in started[0]["argv"], lora
        assert not [e for e in events if e["event"] == "restart"], lora
        assert project_paths(root, lora).out("train.log").read_text().count("fluxgym supervisor launch") == 1
    assert not process_alive(trainer)  # it ended on its own, at the end of its training
    assert MODEL_SAVED in beta.out("train.log").read_text()  # its output after the kill still reached the log
    beta_events = [e["event"] for e in read_events(jobs["beta"].events_file)[0]]
    assert beta_events.count("attached") == 1 and beta_events[-1] == "done"
    # The done event names the trainer's run, so the job still finds its LoRA after a later fresh start of the
    # same LoRA moved it to runs/1/ (as the trainer's run_identity does; a name taken there goes to moved-*/).
    from fluxgym.status import job_lora_file

    for lora, dest in (("alpha", "runs/1"), ("gamma", "runs/1/moved-20261130-120000")):
        j, final = jobs[lora], project_paths(root, lora).final_lora
        assert read_events(j.events_file)[0][-1]["trainer_run"] == 1
        assert job_lora_file(j) == str(final)
        (final.parent / dest).mkdir(parents=True)
        final.rename(final.parent / dest / final.name)
        assert job_lora_file(j) == str(final.parent / dest / final.name)
        capsys.readouterr()  # what earlier commands printed
        assert main(["queue", "list", "--root", str(root), "--json"]) == 0
        listed = {row["id"]: row for row in json.loads(capsys.readouterr().out)["jobs"]}
        assert listed[j.id]["lora_file"] == str(final.parent / dest / final.name)
