"""`resume`: the newest valid state folder (shared validation code) is passed as `--resume <dir>`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from fg_helpers import setup_lora, stand_in_env
from fluxgym.cli import main

try:
    from fluxgym.status import checkpoint_validation

    checkpoint_validation()
    HAVE_VALIDATION = True
except ImportError:  # pragma: no cover - depends on the checkpoints helper's module
    HAVE_VALIDATION = False

pytestmark = pytest.mark.skipif(not HAVE_VALIDATION,
                                reason="sd-scripts/library/checkpoint_validation.py is not there yet")


def make_state(folder: Path, step: int, epoch: int, *, complete: bool = True) -> Path:
    """An upstream-style state folder (no manifest) that the shared validation accepts when complete."""
    folder.mkdir(parents=True)
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    names = ("optimizer.bin", "scheduler.bin") if complete else ("scheduler.bin",)
    for name in names:
        with zipfile.ZipFile(folder / name, "w") as zf:
            zf.writestr("archive/data.pkl", b"stand-in")
    (folder / "random_states_0.pkl").write_bytes(b"stand-in")
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
    return folder


def _argv(tmp_path) -> list[str]:
    return json.loads((tmp_path / "record.json").read_text())["argv"]


def test_resume_passes_newest_valid_state(root, tmp_path, monkeypatch):
    paths, res = setup_lora(root)
    out = paths.output_dir
    make_state(out / "my-lora-000002-state", step=60, epoch=3)
    good = make_state(out / "my-lora-000004-state", step=120, epoch=5)
    make_state(out / "my-lora-000006-state", step=180, epoch=7, complete=False)  # newer but incomplete
    make_state(out / "other-000008-state", step=240, epoch=9)  # another LoRA's state: never picked
    for k, v in stand_in_env(tmp_path, FG_MODE="ok").items():
        monkeypatch.setenv(k, v)
    assert main(["resume", "my-lora", "--root", str(root), "--quiet"]) == 0
    argv = _argv(tmp_path)
    assert argv[-2:] == ["--resume", str(good)]
    assert argv[:-2] == res.argv  # added as an argument: the generated script is unchanged


def test_resume_without_checkpoint_starts_fresh(root, tmp_path, monkeypatch, capsys):
    paths, res = setup_lora(root)
    for k, v in stand_in_env(tmp_path, FG_MODE="ok").items():
        monkeypatch.setenv(k, v)
    assert main(["resume", "my-lora", "--root", str(root), "--quiet"]) == 0
    assert "starting fresh" in capsys.readouterr().out
    assert "--resume" not in _argv(tmp_path)
