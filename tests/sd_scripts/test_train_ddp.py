"""Two processes on CPU (gloo) through `accelerate launch`: data-parallel training works, and a rank
that stalls makes every rank exit non-zero within --ddp_timeout instead of waiting 10-30 minutes."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from safetensors import safe_open

from train_helpers import REPO, SCRIPT, make_dataset, trainer_args


def launch_two(args: list[str], env_extra: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else "python"
    cmd = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env_extra)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True)
    return proc, time.monotonic() - started


@pytest.mark.slow
def test_two_process_training_and_stalled_rank(tiny_models, tmp_path):
    _, toml = make_dataset(tmp_path, count=4, size=64)
    out = tmp_path / "ok"
    proc, _ = launch_two(trainer_args(tiny_models, toml, out, "--max_train_steps", "4", "--save_state",
                                      "--ddp_timeout", "1"), {}, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "num batches per epoch: 2" in proc.stdout  # 4 images split over 2 ranks
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["phase"] == "done" and beat["step"] == 4

    # Rank 1 stalls inside its first step; rank 0 waits in the gradient all-reduce until the bound.
    stalled = tmp_path / "stalled"
    bound_s = 0.25 * 60
    proc, elapsed = launch_two(trainer_args(tiny_models, toml, stalled, "--max_train_steps", "4",
                                            "--ddp_timeout", "0.25", "--stall_dump_timeout", "0"),
                               {"FLUXTRAIN_INJECT_HANG": "step@1"}, timeout=240)
    assert proc.returncode != 0
    startup_allowance = 60
    assert elapsed < startup_allowance + bound_s + 30, elapsed
