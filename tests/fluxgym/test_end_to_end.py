"""End to end with the real trainer on the tiny demo model: prepare + generate + train must succeed."""

from __future__ import annotations

import time

import pytest

from fg_helpers import make_images
from fluxgym.cli import main
from fluxgym.demo import build_demo
from fluxgym.generate import DEFAULT_TRAINER, REPO_ROOT
from fluxgym.naming import project_paths
from fluxgym.runner import run_training

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEFAULT_TRAINER.is_file(), reason=f"the trainer {DEFAULT_TRAINER} is not there yet"),
    pytest.mark.skipif(not (REPO_ROOT / ".venv" / "bin" / "python").exists(), reason="needs the project .venv"),
]


def test_prepare_generate_16g_train_on_demo_model(root, tmp_path):
    build_demo(root)  # tiny models (the dataset it draws is not used here)
    src = make_images(tmp_path / "imgs", 4, size=(96, 80), captions={"img0": "ohwx, a blue square"})
    assert main(["prepare", "E2E LoRA", "--images", str(src), "--trigger", "ohwx", "--resolution", "64",
                 "--root", str(root)]) == 0
    assert main(["generate", "E2E LoRA", "--vram", "16G", "--base-model", "demo", "--resolution", "64",
                 "--epochs", "2", "--save-every", "1", "--repeats", "1", "--workers", "0",
                 "--root", str(root)]) == 0
    paths = project_paths(root, "E2E LoRA")
    res = run_training(paths)
    assert res.success, res.summary
    assert paths.final_lora.stat().st_size > 0
    assert (paths.output_dir / "e2e-lora-000001.safetensors").is_file()


def test_demo_trains_on_cpu_under_two_minutes(root):
    build_demo(root)
    paths = project_paths(root, "demo")
    t0 = time.monotonic()
    res = run_training(paths)
    elapsed = time.monotonic() - t0
    assert res.success, res.summary
    assert elapsed < 120, f"demo training took {elapsed:.0f} s"
    states = sorted(p.name for p in paths.output_dir.glob("demo-*-state"))
    assert states, "checkpointing is on by default: state folders expected"


def test_killed_run_recovers_with_resume(root):
    """Stop the demo after its first checkpoint, then `resume` finishes it from that state folder."""
    import json
    import threading

    from fluxgym.runner import LAST_RUN, stop_run

    build_demo(root, save_every=1)
    paths = project_paths(root, "demo")
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", run_training(paths, grace=5.0)))
    th.start()
    first = paths.output_dir / "demo-000001-state"
    deadline = time.monotonic() + 110
    while not first.is_dir() and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_dir(), "no checkpoint appeared"
    stop_run(paths, grace=5.0)
    th.join(timeout=60)
    assert box["res"].stopped and not box["res"].success
    assert main(["resume", "demo", "--root", str(root), "--quiet"]) == 0
    last = json.loads(paths.out(LAST_RUN).read_text())
    assert last["success"] and last["extra_args"][0] == "--resume"
    assert last["extra_args"][1].startswith(str(paths.output_dir / "demo-0000"))
