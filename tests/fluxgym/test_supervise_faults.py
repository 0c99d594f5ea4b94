"""Faults under the one supervisor with the real trainer on the tiny models: a frozen trainer (SIGSTOP) and an
out-of-memory death under `python -m fluxgym train`, and a two-process gloo job with one stalled rank.
Each is detected within its deadline, the whole tree ends, the run resumes and finishes."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fg_helpers import make_images
from fluxgym.cli import main
from fluxgym.generate import DEFAULT_TRAINER, GenerateOptions, generate
from fluxgym.naming import project_paths
from fluxgym.prepare import prepare_dataset
from fluxgym.supervise import Deadlines, RestartPolicy, RunSpec, Supervisor, read_events
from fluxgym.tiny_training import make_dataset, trainer_args

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEFAULT_TRAINER.is_file(), reason=f"{DEFAULT_TRAINER} is not there")]
REPO = Path(__file__).resolve().parents[2]
CHECK = 2.0  # the supervisor's check interval under `fluxgym train`
SLACK = 5.0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _freeze_past_a_checkpoint(out: Path, frozen: dict, done: threading.Event) -> None:
    """SIGSTOP the trainer once it saved a state and trained past it (like a frozen GPU driver)."""
    while not done.is_set():
        try:
            hb = json.loads((out / "heartbeat.json").read_text())
        except (OSError, ValueError):
            hb = {}
        if hb.get("phase") == "training" and hb.get("last_checkpoint") and hb.get("step", 0) >= 3:
            os.kill(hb["pid"], signal.SIGSTOP)
            frozen.update(pid=hb["pid"], step=hb["step"], at=time.time())
            return
        time.sleep(0.05)


def test_fluxgym_train_recovers_from_a_frozen_trainer_and_out_of_memory(root, tmp_path, tiny_models, monkeypatch):
    (root / "models").symlink_to(Path(tiny_models["unet"]).parents[1])  # the tiny files where `demo` expects them
    paths = project_paths(root, "sv")
    prepare_dataset(make_images(tmp_path / "imgs", 2, size=(64, 64)), paths.dataset_dir, trigger="tok", resolution=64)
    generate(GenerateOptions(name="sv", vram="cpu", root=root, base_model="demo", trigger="tok", epochs=4,
                             save_every=1, repeats=1, resolution=64, workers=0, launcher="python"))
    monkeypatch.setenv("FLUXGYM_PYTHON", sys.executable)
    # Step 7 dies of (injected) out of memory until --blocks_to_swap reaches 6: the first rung of the ladder.
    monkeypatch.setenv("FLUXTRAIN_INJECT_OOM", "step@7<6")
    frozen, done = {}, threading.Event()
    threading.Thread(target=_freeze_past_a_checkpoint, args=(paths.output_dir, frozen, done), daemon=True).start()
    try:
        rc = main(["train", "sv", "--root", str(root), "--quiet", "--stuck-threshold", "10",
                   "--first-step-timeout", "90"])
    finally:
        done.set()
    events, _ = read_events(paths.out("events.jsonl"))
    assert frozen, "the trainer never reached a saved state in training"
    assert rc == 0, [e["message"] for e in events if e["event"] in ("failed", "stall", "restart")]
    stall = [e for e in events if e["event"] == "stall"]
    assert len(stall) == 1 and stall[0]["phase"] == "training" and _gone(frozen["pid"])
    latency = stall[0]["time"] - frozen["at"]
    assert latency <= stall[0]["deadline_s"] + CHECK + SLACK, f"SIGSTOP detected after {latency:.1f} s"
    restarts = [e for e in events if e["event"] == "restart"]
    assert [e["reason"] for e in restarts] == ["stall", "oom"]
    assert [e["blocks_to_swap"] for e in events if e["event"] == "oom_retry"] == [6]
    last = restarts[-1]["argv"]  # appended to train.sh's "$@" (argparse keeps the last value); the script is untouched
    assert last.count("--resume") == 1 and last.count("--blocks_to_swap") == 1
    assert last[last.index("--blocks_to_swap") + 1] == "6" and "sv-0000" in last[last.index("--resume") + 1]
    print(f"\nSIGSTOP at step {frozen['step']}: stall after {latency:.1f} s (deadline {stall[0]['deadline_s']:.0f} s); "
          f"OOM at step 7 -> --blocks_to_swap 6; restarts: {len(restarts)}")
    from library.checkpoint_validation import validate_lora_file

    assert validate_lora_file(paths.final_lora).valid
    last_run = json.loads(paths.out("last_run.json").read_text())
    assert last_run["success"] and [r["reason"] for r in last_run["restarts"]] == ["stall", "oom"]


def test_two_process_job_with_one_stalled_rank_is_ended_resumed_and_finished(tiny_models, tmp_path):
    _, toml = make_dataset(tmp_path, count=4, size=64)
    out = tmp_path / "out"
    marker = tmp_path / "hung-once"
    # Rank 1 hangs inside its first step on the first launch only (the relaunch must be able to finish).
    script = tmp_path / "train.sh"
    script.write_text(
        f'#!/bin/bash\nif [ ! -e "{marker}" ]; then touch "{marker}"; export FLUXTRAIN_INJECT_HANG=step@1; fi\n'
        f'exec "{sys.executable}" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 '
        f'--mixed_precision no --dynamo_backend no --main_process_port 0 "{DEFAULT_TRAINER}" "$@"\n')
    spec = RunSpec(argv=["bash", str(script), *trainer_args(tiny_models, toml, out, "--max_train_steps", "2")],
                   cwd=REPO, output_dir=out, output_name="tiny", env={"HF_HUB_OFFLINE": "1"})
    events: list[dict] = []
    beats: dict = {}

    def on_event(ev: dict) -> None:
        events.append(ev)
        if ev["event"] == "stall" and not beats:  # the ranks' own heartbeats at the moment of the verdict
            beats.update({r: json.loads((out / n).read_text()) for r, n in ((0, "heartbeat.json"),
                                                                            (1, "heartbeat-rank1.json"))})

    sup = Supervisor(spec, deadlines=Deadlines(stuck_threshold=8, first_step=8), check_interval=0.5,
                     kill_grace=2.0, dump_wait=2.0, on_event=on_event, policy=RestartPolicy(max_restarts=2))
    outcome = sup.run()
    assert outcome.state == "done", [e["message"] for e in events if e["event"] in ("failed", "stall", "restart")]
    stall = next(e for e in events if e["event"] == "stall")
    assert beats[1]["phase"] == "training" and beats[0]["pid"] != beats[1]["pid"]
    assert _gone(beats[0]["pid"]) and _gone(beats[1]["pid"])  # both ranks ended, not only the stuck one
    since = stall["time"] - max(beats[0]["time"], beats[1]["time"])
    assert since <= stall["deadline_s"] + 0.5 + SLACK, f"stalled rank detected {since:.1f} s after the last beat"
    assert outcome.restarts[0]["reason"] == "stall" and outcome.lora_file == out / "tiny.safetensors"
    print(f"\nrank stall detected {since:.1f} s after the last heartbeat (deadline {stall['deadline_s']:.0f} s); "
          f"restarts: {len(outcome.restarts)}")
