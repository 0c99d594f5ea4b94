"""checkpoint_io with a real accelerate.Accelerator(cpu=True): save/load round trip, upstream-format folders,
resume mismatches, crash points inside a real state save, rotation, and the save hang injection point."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import accelerate
import pytest
import torch
from safetensors.torch import load_file, safe_open

from library import atomic_io, checkpoint_io as cio
from library.checkpoint_validation import (
    DATA_SHA_KEY,
    discover,
    is_complete_staged,
    newest_valid_state,
    read_manifest,
    validate_lora_file,
    validate_state_dir,
    verify_manifest_files,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import ckpt_zoo  # noqa: E402

SETTINGS = {"network_dim": 4, "network_alpha": 1.0, "train_blocks": "all", "optimizer_type": "AdamW"}


def _setup(seed: int):
    torch.manual_seed(seed)
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sch = acc.prepare(model, opt, sch)
    return acc, model, opt, sch


def _train(parts, n: int) -> list[float]:
    acc, model, opt, sch = parts
    losses = []
    for _ in range(n):
        x = torch.randn(8, 4)  # drawn from the global RNG: only an exact RNG restore reproduces it
        loss = model(x).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sch.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _save(parts, final: Path, step: int, settings=SETTINGS, ops=None) -> Path:
    return cio.save_state_folder(
        final, accelerator=parts[0], output_name="demo", step=step, epoch=0,
        data_position={"epoch": 0, "batch_in_epoch": step}, resume_settings=settings, args_digest="d" * 16,
        current_epoch_1based=1, ops=ops,
    )


def test_save_lora_file_embeds_data_hash(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(4, 8), "lora_unet_a.alpha": torch.tensor(4.0)}
    f = cio.save_lora_file(tmp_path / "demo-000001.safetensors", tensors, {"ss_steps": 12, "ss_network_dim": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["demo-000001.safetensors"]
    loaded = load_file(f)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(f, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_steps"] == "12" and len(meta[DATA_SHA_KEY]) == 64
    info = validate_lora_file(f)
    assert info.valid and info.step == 12 and info.has_manifest
    ckpt_zoo.zero_tail(f, 8)
    assert "zero-filled" in validate_lora_file(f).reason


def test_state_roundtrip_resume_is_bit_identical(tmp_path):
    straight = _setup(0)
    losses_a = _train(straight, 5)

    first = _setup(0)
    losses_b = _train(first, 2)
    path = _save(first, tmp_path / "demo-step00000002-state", step=2)
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin",
        "train_state.json"]
    assert json.loads((path / "train_state.json").read_text()) == {"current_epoch": 1, "current_step": 2}
    m = read_manifest(path)
    assert (m["step"], m["epoch"], m["data_position"]) == (2, 0, {"epoch": 0, "batch_in_epoch": 2})
    assert m["resume_settings"] == SETTINGS and m["versions"]["accelerate"] == accelerate.__version__
    verify_manifest_files(path, m)

    resumed = _setup(99)  # different init and RNG: everything must come from the folder
    info = cio.load_state_folder(path, accelerator=resumed[0], resume_settings=dict(SETTINGS))
    assert (info.step, info.epoch, info.data_position, info.warnings) == (2, 0, {"epoch": 0, "batch_in_epoch": 2}, [])
    losses_b += _train(resumed, 3)
    assert losses_b == losses_a
    for p_a, p_b in zip(straight[1].parameters(), resumed[1].parameters()):
        assert torch.equal(p_a, p_b)
    assert resumed[3].get_last_lr() == straight[3].get_last_lr()


def test_resume_mismatch_names_setting_and_values(tmp_path):
    path = _save(_setup(0), tmp_path / "demo-state", step=3)
    target = _setup(1)
    before = [p.detach().clone() for p in target[1].parameters()]
    with pytest.raises(cio.ResumeMismatchError) as err:
        cio.load_state_folder(path, accelerator=target[0], resume_settings={**SETTINGS, "network_dim": 16})
    msg = str(err.value)
    assert "network_dim: checkpoint has 4, this run has 16" in msg and str(path) in msg
    assert all(torch.equal(a, b) for a, b in zip(before, target[1].parameters()))  # nothing was loaded
    # values that only change type through JSON (tuple -> list, int -> float) are not mismatches
    path2 = _save(_setup(0), tmp_path / "demo-000001-state", step=1, settings={**SETTINGS, "betas": (0.9, 0.99)})
    info = cio.load_state_folder(path2, accelerator=_setup(1)[0],
                                 resume_settings={**SETTINGS, "betas": [0.9, 0.99], "network_alpha": 1})
    assert info.step == 1 and info.warnings == []


def _upstream_folder(tmp_path: Path, parts, rng_states: dict | None) -> Path:
    """What upstream sd-scripts writes: accelerate's files + train_state.json, no manifest."""
    d = tmp_path / "demo-000002-state"
    parts[0].save_state(str(d))
    (d / "train_state.json").write_text(json.dumps({"current_epoch": 2, "current_step": 7}))
    if rng_states is not None:
        torch.save(rng_states, d / "random_states_0.pkl")
    return d


class _Opaque:
    """Something a weights_only unpickler refuses, as old numpy/accelerate pickles can be."""


def test_upstream_folder_rng_without_step_resumes_with_warning(tmp_path):
    src = _setup(0)
    _train(src, 2)
    states = torch.load(_upstream_folder(tmp_path / "probe", src, None) / "random_states_0.pkl", weights_only=False)
    states.pop("step")  # accelerate 0.32/0.33-era pickles have no step
    d = _upstream_folder(tmp_path, src, states)
    assert validate_state_dir(d).valid and not validate_state_dir(d).has_manifest
    dst = _setup(5)
    info = cio.load_state_folder(d, accelerator=dst[0], resume_settings=SETTINGS)
    assert info.step == 7 and info.data_position is None and not info.has_manifest
    assert any("no 'step'" in w for w in info.warnings) and any("no checkpoint.json" in w for w in info.warnings)
    assert all(torch.equal(a, b) for a, b in zip(src[1].parameters(), dst[1].parameters()))
    assert dst[1].weight.device.type == "cpu" and dst[2].state_dict()["state"]  # optimizer moments restored


def test_rng_pickle_rejected_by_weights_only_loads_the_rest(tmp_path):
    src = _setup(0)
    _train(src, 1)
    d = _upstream_folder(tmp_path, src, {"random_state": _Opaque(), "step": 1})
    dst = _setup(3)
    info = cio.load_state_folder(d, accelerator=dst[0], resume_settings=SETTINGS)
    assert any("could not be loaded safely" in w for w in info.warnings), info.warnings
    assert all(torch.equal(a, b) for a, b in zip(src[1].parameters(), dst[1].parameters()))


def test_corrupt_folder_is_refused_with_hint(tmp_path):
    path = _save(_setup(0), tmp_path / "demo-state", step=1)
    ckpt_zoo.zero_tail(path / "optimizer.bin", 64)
    with pytest.raises(cio.CheckpointLoadError, match="find_checkpoint.py"):
        cio.load_state_folder(path, accelerator=_setup(0)[0], resume_settings=SETTINGS)


def test_real_state_save_crash_at_every_op(tmp_path):
    parts = _setup(0)
    _train(parts, 1)
    template = tmp_path / "template"
    _save(parts, template / "demo-step00000001-state", step=1)
    _save(parts, template / "demo-state", step=1)
    counter = atomic_io.CountingFsOps(real_fsync=False)
    _save(parts, tmp_path / "count" / "demo-state", step=2, ops=counter)
    assert counter.count >= 12
    for k in range(1, counter.count + 1):
        out = tmp_path / f"k{k}"
        shutil.copytree(template, out)
        with pytest.raises(atomic_io.FsCrash):
            _save(parts, out / "demo-state", step=2, ops=atomic_io.CountingFsOps(crash_at=k, real_fsync=False))
        for phase in ("after crash", "after cleanup"):
            assert all(i.valid for i in discover(out, leftovers=False)), phase
            best = newest_valid_state(out, log=False)
            verify_manifest_files(best.path, read_manifest(best.path))
            assert best.step in (1, 2)
            atomic_io.cleanup_leftovers(out, is_complete=is_complete_staged)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_rotate_epochs_steps_and_never_counts_invalid(tmp_path):
    for e in range(1, 6):
        lora = tmp_path / f"demo-{e:06d}.safetensors"
        cio.save_lora_file(lora, {"w": torch.full((2,), float(e))}, {"ss_steps": e * 10})
        ckpt_zoo.write_state(tmp_path, "demo", step=e * 10, epoch=e, folder=f"demo-{e:06d}-state")
    for s in (100, 200, 300, 400, 500):
        ckpt_zoo.write_state(tmp_path, "demo", step=s)
    cio.save_lora_file(tmp_path / "demo.safetensors", {"w": torch.zeros(2)}, {"ss_steps": 600})
    ckpt_zoo.zero_tail(tmp_path / "demo-000005-state" / "model.safetensors", 8)  # newest epoch state broken

    cio.rotate(tmp_path, "demo", last_n_epochs=2, last_n_steps_state=300)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == [
        "demo-000004.safetensors", "demo-000005.safetensors", "demo.safetensors"]
    # epoch states fall back to last_n_epochs (2 valid kept: 3 and 4); the broken 5 is not counted nor deleted
    assert [n for n in names if n.startswith("demo-0") and n.endswith("-state")] == [
        "demo-000003-state", "demo-000004-state", "demo-000005-state"]
    # upstream's step rule: every=100, N=300 at step 500 keeps 200..500
    assert [n for n in names if "-step" in n] == [
        "demo-step00000200-state", "demo-step00000300-state", "demo-step00000400-state", "demo-step00000500-state"]
    assert not [n for n in names if n.startswith(".")]


def test_save_hang_injection_point_is_inside_the_temp_folder(tmp_path, monkeypatch):
    parts = _setup(0)
    monkeypatch.setenv("FLUXTRAIN_INJECT_HANG", "save")
    t = threading.Thread(target=_save, args=(parts, tmp_path / "demo-state", 1), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    tmps = []
    while time.monotonic() < deadline and not tmps:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".demo-state.tmp-")]
        time.sleep(0.05)
    time.sleep(0.3)
    assert t.is_alive() and tmps and (tmps[0] / "model.safetensors").exists()
    assert not (tmp_path / "demo-state").exists() and newest_valid_state(tmp_path, log=False) is None
