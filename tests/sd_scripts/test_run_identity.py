"""Runs are kept apart: a new run moves the previous run's files to runs/<id>/, every checkpoint names its
run, `--resume auto` continues the folder's current run, and processes that disagree on the run stop
before the first step."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from safetensors import safe_open

from train_helpers import REPO, SCRIPT, make_dataset, run_trainer, trainer_args


def lora_meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def manifest(path) -> dict:
    return json.loads((path / "checkpoint.json").read_text())


def test_new_run_keeps_the_previous_one_apart_and_resume_auto_continues_its_own(tiny_models, tmp_path):
    """The issue's scenario: train, regenerate with more epochs and another learning rate, kill it mid-run,
    resume: it continues the second run, and the first run's files are all still there."""
    _, toml = make_dataset(tmp_path, count=1, size=64)  # 1 step per epoch
    out = tmp_path / "out"
    first = trainer_args(tiny_models, toml, out, "--max_train_epochs", "2", "--save_every_n_epochs", "1",
                         "--save_state")
    proc = run_trainer(first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starts run 1 " in proc.stdout
    assert manifest(out / "tiny-state")["run_id"] == 1 and manifest(out / "tiny-state")["step"] == 2

    second = trainer_args(tiny_models, toml, out, "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                          "--save_state")
    second[second.index("--learning_rate") + 1] = "5e-4"
    proc = run_trainer(second, env={"FLUXTRAIN_EXIT_AFTER_STEP": "1"})  # killed after its first epoch's save
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "starts run 2 " in proc.stdout and "moved" in proc.stdout
    kept = out / "runs" / "1"
    for name in ("tiny-state", "tiny-000001-state", "tiny.safetensors", "tiny-000001.safetensors"):
        assert (kept / name).exists(), name
    assert manifest(kept / "tiny-000001-state")["run_id"] == 1
    assert lora_meta(kept / "tiny.safetensors")["ss_steps"] == "2"
    assert not (out / "tiny-state").exists() and not (out / "tiny.safetensors").exists()
    assert manifest(out / "tiny-000001-state")["run_id"] == 2
    assert lora_meta(out / "tiny-000001.safetensors")["fluxtrain_run_id"] == "2"

    # A state of the first run put back at the top (step 2, newer than the second run's step 1) is not taken.
    shutil.copytree(kept / "tiny-state", out / "tiny-state")
    proc = run_trainer(second + ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'tiny-000001-state'}: step 1" in proc.stdout
    assert "continuing run 2" in proc.stdout and "not taking 1 state folder(s) of other runs (run 1" in proc.stdout
    assert "continues run 2 " in proc.stdout
    final = lora_meta(out / "tiny.safetensors")
    assert final["fluxtrain_run_id"] == "2" and final["ss_steps"] == "3" and final["ss_learning_rate"] == "0.0005"
    assert final["fluxtrain_settings_hash"] == manifest(out / "tiny-state")["args_digest"]
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["run_id"] == 2 and beat["phase"] == "done" and beat["step"] == 3
    assert json.loads((out / "fluxtrain-runs.json").read_text())["runs"]["tiny"]["run_id"] == 2

    from tools import find_checkpoint

    listing = subprocess.run([sys.executable, str(REPO / "tools" / "find_checkpoint.py"), str(out), "--list"],
                             capture_output=True, text=True, timeout=60)
    assert "run 1: 2 state folder(s), 2 LoRA file(s)" in listing.stdout, listing.stdout
    assert find_checkpoint.main([str(out), "--json"]) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_with_separate_output_folders_stop_before_the_first_step(tiny_models, tmp_path):
    """Two machines that do not share the output folder: every rank fails naming both views, nothing trains."""
    _, toml = make_dataset(tmp_path, count=4, size=64)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        args = trainer_args(tiny_models, toml, tmp_path / f"machine{rank}", "--max_train_steps", "4",
                            "--ddp_timeout", "1")
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=str(REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    results = [p.communicate(timeout=240) for p in procs]
    assert time.monotonic() - started < 120
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == 2, stdout[-2000:] + stderr[-2000:]
        assert "processes disagree before the first step" in stderr
        assert "rank 0 starts at step 0, run 1" in stderr and "rank 1 starts at step 0, no recorded run" in stderr
        assert not list((tmp_path / f"machine{rank}").glob("*.safetensors"))
    assert "processes: 2 on 1 machine(s), backend gloo" in results[0][0]


def test_agreement_check_names_both_resume_steps():
    from library.errors import ResumeError
    from library.rank_agreement import check_agreement

    view = {"rank": 0, "run_id": 3, "token": "ab", "settings_hash": "f" * 64, "resume_step": 26,
            "resume_from": "/shared/out/x-step00000026-state"}
    check_agreement([view, {**view, "rank": 1}])  # the same run from the same step: fine
    try:
        check_agreement([view, {**view, "rank": 1, "resume_step": 0, "resume_from": None}])
    except ResumeError as exc:
        text = str(exc)
    else:
        raise AssertionError("a mismatch passed")
    assert "rank 0 resumes at step 26" in text and "rank 1 starts at step 0" in text and "resume_step" in text


def test_discovery_follows_the_current_run_and_a_fresh_start_moves_every_other_run(tmp_path, capsys):
    """Without the trainer: the state of the folder's current run wins over a higher step of another run in
    every tool, and a fresh start moves both runs' files to runs/<id>/ and takes the next number."""
    from library import checkpoint_validation as cv
    from library.run_identity import begin_run
    from test_preflight import fake_state
    from tools import find_checkpoint

    from fluxgym.naming import project_paths
    from fluxgym.status import format_status, run_status

    paths = project_paths(tmp_path, "tiny")
    out = paths.output_dir
    fake_state(out / "tiny-state", 4, run_id=1, step=9)
    fake_state(out / "tiny-000001-state", 4, run_id=2, step=3)
    (out / "fluxtrain-runs.json").write_text(json.dumps({"last_run_id": 2, "runs": {"tiny": {"run_id": 2, "token": "t"}}}))
    assert cv.newest_valid_state(out, "tiny", log=False).path == out / "tiny-000001-state"
    assert find_checkpoint.main([str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["newest"]["state"]["path"] == str(out / "tiny-000001-state")

    identity, lines = begin_run(out, "tiny", "h" * 64, resume_from=None)
    assert identity.run_id == 3 and "starts run 3" in lines[0]
    assert (out / "runs" / "1" / "tiny-state").is_dir() and (out / "runs" / "2" / "tiny-000001-state").is_dir()
    assert not list(out.glob("tiny*")) and cv.newest_valid_state(out, "tiny", log=False) is None
    assert json.loads((out / "fluxtrain-runs.json").read_text())["runs"]["tiny"]["run_id"] == 3
    assert begin_run(out, "tiny", "h" * 64, resume_from=None)[0].run_id == 4  # numbers never repeat
    status = format_status(run_status(paths))
    assert "earlier run 1: 1 state folder(s)" in status and "earlier run 2: 1 state folder(s)" in status
