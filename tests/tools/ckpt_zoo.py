"""Builders for checkpoint fixtures (stdlib only): state folders in our and upstream layout, LoRA files, and
one output folder per corruption case. Used by the find_checkpoint/atomic_io tests and the kill-trial saver.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import sys
import zipfile
from pathlib import Path

_SD = Path(__file__).resolve().parents[2] / "sd-scripts"
if str(_SD) not in sys.path:
    sys.path.insert(0, str(_SD))

from library import atomic_io  # noqa: E402
from library.checkpoint_validation import DATA_SHA_KEY, lora_file_name, state_dir_name  # noqa: E402

FIXED_CREATED = "2026-01-01T00:00:00+00:00"


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def safetensors_bytes(seed: int, n_tensors: int = 2, floats: int = 64, metadata: dict | None = None,
                      data_hash: bool = False) -> bytes:
    """A valid safetensors file of F32 tensors filled with seeded random bytes."""
    header, data, off = {}, b"", 0
    for i in range(n_tensors):
        chunk = _rand(seed * 1000 + i, floats * 4)
        key = f"lora_unet_t{i}.lora_down.weight"
        header[key] = {"dtype": "F32", "shape": [floats], "data_offsets": [off, off + len(chunk)]}
        data += chunk
        off += len(chunk)
    meta = dict(metadata or {})
    if data_hash:
        meta[DATA_SHA_KEY] = hashlib.sha256(data).hexdigest()
    if meta:
        header["__metadata__"] = {k: str(v) for k, v in meta.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def zip_bin_bytes(seed: int, n: int = 512) -> bytes:
    """A stand-in for a torch.save archive: a stored zip with a data.pkl member (same checks apply)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _rand(seed, n))
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


def state_files(step: int, epoch: int, seed: int = 0, payload: int = 64) -> dict[str, bytes]:
    return {
        "model.safetensors": safetensors_bytes(seed + step, floats=payload),
        "optimizer.bin": zip_bin_bytes(seed + step + 1, payload * 8),
        "scheduler.bin": zip_bin_bytes(seed + step + 2, 64),
        "random_states_0.pkl": zip_bin_bytes(seed + step + 3, 128),
        "train_state.json": json.dumps({"current_epoch": epoch + 1, "current_step": step}).encode(),
    }


def manifest_body(output_name: str, step: int, epoch: int) -> dict:
    return {
        "format": "fluxtrain-checkpoint", "version": 1, "kind": "state", "output_name": output_name,
        "step": step, "epoch": epoch, "data_position": {"epoch": epoch, "batch_in_epoch": 0},
        "versions": {"fluxtrain_checkpoint": 1}, "args_digest": "0" * 16,
        "resume_settings": {"network_dim": 4}, "created": FIXED_CREATED,
    }


def write_state(out: Path, output_name: str, *, step: int, epoch: int = 0, folder: str | None = None,
                manifest: bool = True, ops=None, payload: int = 64, mtime: float | None = None) -> Path:
    """A complete state folder written through atomic_io (our layout), or plainly (manifest=False, upstream)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    final = Path(out) / (folder or state_dir_name(output_name, step=step))
    files = state_files(step, epoch, payload=payload)
    if manifest:
        with atomic_io.atomic_dir(final, ops=ops) as stage:
            for rel, data in files.items():
                stage.write_bytes(rel, data)
            stage.set_manifest(manifest_body(output_name, step, epoch))
    else:
        final.mkdir(parents=True)
        for rel, data in files.items():
            (final / rel).write_bytes(data)
    if mtime is not None:
        os.utime(final, (mtime, mtime))
        if manifest:
            os.utime(final / "checkpoint.json", (mtime, mtime))
    return final


def write_lora(out: Path, output_name: str, *, step: int | None = None, epoch: int | None = None,
               ss_steps: int | None = None, data_hash: bool = True, mtime: float | None = None) -> Path:
    path = Path(out) / lora_file_name(output_name, epoch=epoch, step=step)
    meta = {"ss_output_name": output_name}
    if ss_steps is not None:
        meta["ss_steps"] = ss_steps
    path.write_bytes(safetensors_bytes(ss_steps or step or epoch or 0, metadata=meta, data_hash=data_hash))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])


def zero_tail(path: Path, n: int) -> None:
    """Same size, last n bytes zeroed: what a power loss after a size update but before the data leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - n] + b"\0" * n)


T0 = 1_700_000_000.0  # fixed mtimes keep the golden output stable


def _base(out: Path, name: str = "demo") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_state(out, name, step=100, epoch=0, mtime=T0)
    return out


# case -> (builder, expected newest valid folder name, substring of the newer candidate's skip reason)
def _truncated(out):
    p = write_state(_base(out), "demo", step=200, mtime=T0 + 10)
    truncate(p / "model.safetensors", 40)
    return "model.safetensors is"


def _truncated_upstream(out):
    p = write_state(_base(out), "demo", step=200, manifest=False, mtime=T0 + 10)
    truncate(p / "model.safetensors", 40)
    return "truncated?"


def _zero_tail(out):
    p = write_state(_base(out), "demo", step=200, mtime=T0 + 10)
    zero_tail(p / "optimizer.bin", 100)
    return "does not match its manifest sha256"


def _zero_tail_upstream(out):
    p = write_state(_base(out), "demo", step=200, manifest=False, mtime=T0 + 10)
    zero_tail(p / "optimizer.bin", 100)
    return "optimizer.bin: not a readable archive"


def _missing_optimizer(out):
    p = write_state(_base(out), "demo", step=200, mtime=T0 + 10)
    (p / "optimizer.bin").unlink()
    return "optimizer.bin listed in the manifest is missing"


def _missing_optimizer_upstream(out):
    p = write_state(_base(out), "demo", step=200, manifest=False, mtime=T0 + 10)
    (p / "optimizer.bin").unlink()
    return "optimizer.bin missing"


def _garbled_manifest(out):
    p = write_state(_base(out), "demo", step=200, mtime=T0 + 10)
    (p / "checkpoint.json").write_text('{"format": "fluxtrain-checkpoint", "step": 2')
    return "manifest checkpoint.json unreadable"


def _marker_without_files(out):
    p = Path(_base(out)) / state_dir_name("demo", step=200)
    p.mkdir()
    body = manifest_body("demo", 200, 0)
    body["files"] = {}
    (p / "checkpoint.json").write_text(json.dumps(body))
    return "manifest lists no model weights"


def _leftover_temp(out):
    _base(out)
    tmp = out / ".demo-step00000200-state.tmp-999999-deadbeef"
    tmp.mkdir()
    for rel, data in state_files(200, 0).items():
        (tmp / rel).write_bytes(data)
    return None  # never a candidate at all


def _step_999_vs_1000(out):
    out.mkdir(parents=True, exist_ok=True)
    write_state(out, "demo", step=999, mtime=T0 + 50)  # newer mtime must not win
    write_state(out, "demo", step=1000, mtime=T0)
    return None


def _mixed_epoch_step(out):
    out.mkdir(parents=True, exist_ok=True)
    write_state(out, "demo", step=300, epoch=3, folder=state_dir_name("demo", epoch=3), mtime=T0)
    write_state(out, "demo", step=250, mtime=T0 + 20)
    write_state(out, "demo", step=320, epoch=3, folder=state_dir_name("demo", epoch=4), mtime=T0 + 5)
    (out / state_dir_name("demo", epoch=4) / "scheduler.bin").unlink()
    return "scheduler.bin listed in the manifest is missing"


def _upstream_only(out):
    out.mkdir(parents=True, exist_ok=True)
    write_state(out, "demo", step=100, manifest=False, mtime=T0)
    write_state(out, "demo", step=150, manifest=False, folder="demo-state", mtime=T0 + 1)
    return None


ZOO = {
    "truncated_safetensors": (_truncated, "demo-step00000100-state"),
    "truncated_safetensors_upstream": (_truncated_upstream, "demo-step00000100-state"),
    "zero_filled_tail": (_zero_tail, "demo-step00000100-state"),
    "zero_filled_tail_upstream": (_zero_tail_upstream, "demo-step00000100-state"),
    "missing_optimizer": (_missing_optimizer, "demo-step00000100-state"),
    "missing_optimizer_upstream": (_missing_optimizer_upstream, "demo-step00000100-state"),
    "garbled_manifest": (_garbled_manifest, "demo-step00000100-state"),
    "leftover_temp": (_leftover_temp, "demo-step00000100-state"),
    "marker_without_files": (_marker_without_files, "demo-step00000100-state"),
    "step_999_vs_1000": (_step_999_vs_1000, "demo-step00001000-state"),
    "mixed_epoch_and_step": (_mixed_epoch_step, "demo-000003-state"),
    "upstream_without_manifest": (_upstream_only, "demo-state"),
}


def build_case(root: Path, case: str) -> tuple[Path, str, str | None]:
    """Build one corruption case in root/case; returns (output_dir, expected folder name, skip reason)."""
    builder, expected = ZOO[case]
    out = Path(root) / case
    reason = builder(out)
    return out, expected, reason
