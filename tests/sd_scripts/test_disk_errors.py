"""A full, over-quota or read-only disk during a later write is one DiskError (exit 5) saying what to free, never
torch's C++ traceback, and the previous checkpoint stays valid. ENOSPC/EROFS are injected at the OS-call level
(an FsOps that fails like the kernel would), and where tmpfs can be mounted, a real filesystem fills up."""
from __future__ import annotations

import re

import contextlib
import errno
import os
import subprocess
import uuid
from pathlib import Path

import accelerate
import numpy as np
import pytest
import torch

from library import atomic_io, checkpoint_io as cio, disk_errors, errors
from library.checkpoint_validation import validate_lora_file, validate_state_dir
from library.npz_io import atomic_savez

SETTINGS = {"network_dim": 4}


class FullDiskOps(atomic_io.FsOps):
    """Fails the first write whose path contains `match` with `err` (after writing part of it, as a real
    ENOSPC does)."""

    def __init__(self, match: str, err: int = errno.ENOSPC):
        self.match, self.err = match, err

    def write_bytes(self, path: Path, data: bytes) -> None:
        if self.match in str(path):
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 3])
            raise OSError(self.err, os.strerror(self.err), str(path))
        super().write_bytes(path, data)


def _accelerator(width: int = 16):
    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(width, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return acc


def _save_state(acc, out: Path, step: int, ops=None) -> Path:
    return cio.save_state_folder(
        out / f"demo-step{step:08d}-state", accelerator=acc, output_name="demo", step=step, epoch=0,
        data_position={"epoch": 0, "batch_in_epoch": step}, resume_settings=SETTINGS, args_digest="d" * 16,
        current_epoch_1based=1, ops=ops)


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]


def test_lora_file_enospc_is_one_clear_error_and_keeps_the_previous_file(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(4, 64)}
    final = tmp_path / "demo.safetensors"
    cio.save_lora_file(final, tensors, {"ss_steps": "1"})
    with pytest.raises(errors.DiskError) as info:
        cio.save_lora_file(final, {"lora_unet_a.lora_down.weight": torch.randn(4, 64)}, {"ss_steps": "2"},
                           ops=FullDiskOps(".tmp-"))
    msg = str(info.value)
    assert msg.startswith(f"disk full while saving the LoRA file to {final} (it needs about ")
    assert "it needs about" in msg and "--save_last_n_epochs/--save_last_n_steps" in msg
    assert info.value.exit_code == errors.EXIT_DISK == 5
    assert validate_lora_file(final).valid and _leftovers(tmp_path) == []


@pytest.mark.parametrize("err,head", [(errno.ENOSPC, "disk full while saving the training state"),
                                      (errno.EDQUOT, "disk quota exceeded while saving the training state"),
                                      (errno.EROFS, "the disk is read-only: could not save the training state")])
def test_state_folder_write_errors_keep_the_previous_state(tmp_path, err, head):
    acc = _accelerator()
    first = _save_state(acc, tmp_path, 1)
    with pytest.raises(errors.DiskError) as info:
        _save_state(acc, tmp_path, 2, ops=FullDiskOps("train_state.json", err))
    assert str(info.value).startswith(head), info.value
    if err != errno.EROFS:
        assert re.search(r"it needs about \d+ KB, [\d.]+ [KMG]B are free now\): free at least", str(info.value))
    assert validate_state_dir(first).valid
    assert not (tmp_path / "demo-step00000002-state").exists() and _leftovers(tmp_path) == []


def test_errno_hidden_by_torch_is_judged_by_free_space(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as 'enforce fail ... unexpected pos' with no errno."""
    acc = _accelerator()
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 122880 vs 122772")

    def failing_save_state(path, **kw):
        Path(path, "optimizer.bin").write_bytes(b"partial")
        raise torch_error

    monkeypatch.setattr(acc, "save_state", failing_save_state)
    monkeypatch.setattr(disk_errors, "free_bytes", lambda path: 4096)
    with pytest.raises(errors.DiskError, match="^disk full while saving the training state") as info:
        _save_state(acc, tmp_path, 3)
    assert info.value.__cause__.errno == errno.ENOSPC and info.value.__cause__.__cause__ is torch_error
    assert "inline_container" not in str(info.value)
    # With room on the disk the same error is not a disk problem and keeps its own text.
    monkeypatch.setattr(disk_errors, "free_bytes", lambda path: 50 * 2**30)
    with pytest.raises(RuntimeError, match="inline_container") as info:
        _save_state(acc, tmp_path, 4)
    assert not isinstance(info.value, errors.DiskError)
    assert _leftovers(tmp_path) == []


@contextlib.contextmanager
def mounted_tmpfs(tmp_path: Path, size: str):
    """A real filesystem of `size` (tmpfs); skips the test where mounting is not allowed."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path, "1200k") as mnt:
        yield mnt


def test_real_full_filesystem(small_tmpfs):
    acc = _accelerator(256)  # ~0.8 MB per state folder: the first fits, the second cannot
    first = _save_state(acc, small_tmpfs, 1)
    with pytest.raises(errors.DiskError) as info:
        _save_state(acc, small_tmpfs, 2)
    msg = str(info.value)
    assert msg.startswith(f"disk full while saving the training state to {small_tmpfs}/demo-step00000002-state")
    assert "it needs about 1.0 MB" in msg and "RuntimeError" not in msg, msg
    assert validate_state_dir(first).valid and _leftovers(small_tmpfs) == []
    # Cache files and sample images name their own fix (the disk filled to the last byte first).
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    with pytest.raises(errors.DiskError, match="disk full while saving a cache file .* move the dataset"):
        atomic_savez(small_tmpfs / "img_0064x0064_flux.npz", {"latents": np.zeros((4, 64, 64), np.float32)})
    from PIL import Image

    from library.sampling import _save_png_atomic

    noise = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))
    with pytest.raises(errors.DiskError, match="disk full while saving a sample image .* sample less often"):
        _save_png_atomic(noise, small_tmpfs / "sample" / "demo_000001.png")
    assert validate_state_dir(first).valid and _leftovers(small_tmpfs) == []


@pytest.mark.slow
def test_trainer_on_a_filling_disk_exits_5_with_one_line(tiny_models, tmp_path):
    """The real trainer saving a state every step onto a 2 MB filesystem: it runs out of room mid-run."""
    import json

    from train_helpers import make_dataset, run_trainer, trainer_args

    _, toml = make_dataset(tmp_path, count=2, size=64)  # caches go next to the images, off the small disk
    with mounted_tmpfs(tmp_path, "2m") as out:
        proc = run_trainer(trainer_args(tiny_models, toml, out, "--max_train_steps", "20", "--save_every_n_steps",
                                        "1", "--save_state"))
        assert proc.returncode == errors.EXIT_DISK, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "error: disk full while saving the" in proc.stderr and "--save_last_n_epochs" in proc.stderr
        assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
        beat = json.loads((out / "heartbeat.json").read_text())
        assert beat["phase"] == "failed" and "disk full while saving" in beat["message"]
        states = sorted(out.glob("tiny-step*-state"))
        assert states and all(validate_state_dir(p).valid for p in states)
        assert _leftovers(out) == []
