"""Helpers for tests that run the real trainer entry script on the tiny models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fluxgym.tiny_training import COLOURS, make_dataset, trainer_args  # noqa: F401 (shared with tools/benchmark.py)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "sd-scripts" / "flux_train_network.py"


def run_trainer(args: list[str], *, launcher: str = "python", env: dict | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    python = REPO / ".venv" / "bin" / "python"
    python = str(python) if python.exists() else sys.executable
    if launcher == "accelerate":
        cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               str(SCRIPT), *args]
    else:
        cmd = [python, str(SCRIPT), *args]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO))
