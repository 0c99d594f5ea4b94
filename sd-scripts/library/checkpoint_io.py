"""Writing and reading training checkpoints (LoRA files and accelerate state folders), crash-safe.

- `save_lora_file`: atomic safetensors write carrying `fluxtrain_data_sha256` (tensor-data hash).
- `save_state_folder`: accelerate state + `train_state.json` + `checkpoint.json` (last) published by rename.
- `inspect_state_folder`: validates a state folder and checks resume settings (preflight, before models load);
  `restore_state_folder` restores it via accelerate and reports what could not be restored (old RNG pickles
  without `step`, pickles rejected by `weights_only`); `load_state_folder` does both.
- `rotate`: keeps the newest N complete checkpoints per kind, deleting only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import platform
import struct
from pathlib import Path

from library import atomic_io, disk_errors
from library.checkpoint_validation import (
    DATA_SHA_KEY,
    MANIFEST_FORMAT,
    TRAIN_STATE_NAME,
    CheckpointInfo,
    discover,
    read_manifest,
    read_train_state,
    validate_state_dir,
)
from library.errors import ResumeError
from library.fault_injection import inject_point

logger = logging.getLogger(__name__)

RNG_FILE = "random_states_0.pkl"


class ResumeMismatchError(ResumeError):
    """A setting that must match on resume differs between the checkpoint and this run."""


class CheckpointLoadError(ResumeError, RuntimeError):
    """The state folder cannot be used for --resume."""


@dataclasses.dataclass
class ResumeInfo:
    step: int  # optimizer steps completed (absolute)
    epoch: int  # epochs fully completed
    data_position: dict | None  # {"epoch", "batch_in_epoch"}; None for upstream folders: derive from step
    warnings: list[str]
    has_manifest: bool = False
    path: Path | None = None
    run_id: int | None = None  # the run that wrote it (None: upstream-made or older)


# ---------------------------------------------------------------- LoRA files


def _data_section(blob: bytes) -> memoryview:
    (n,) = struct.unpack("<Q", blob[:8])
    return memoryview(blob)[8 + n :]


def save_lora_file(final_path, tensors: dict, metadata: dict | None, *, ops: atomic_io.FsOps | None = None) -> Path:
    """Write a LoRA safetensors file atomically, adding the tensor-data sha256 to its metadata (as ours and
    as upstream's sshs_model_hash, with sshs_legacy_hash beside it)."""
    from safetensors.torch import save as st_save

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.pop(DATA_SHA_KEY, None)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # The data section does not depend on the metadata, so hash it from a first serialisation. That one
    # carries only the ss_* keys, which is what upstream hashes for sshs_model_hash / sshs_legacy_hash.
    draft = st_save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    meta[DATA_SHA_KEY] = meta["sshs_model_hash"] = hashlib.sha256(_data_section(draft)).hexdigest()
    meta["sshs_legacy_hash"] = hashlib.sha256(draft[0x100000:0x110000]).hexdigest()[:8]
    blob = st_save(tensors, metadata=meta)
    # FIX: a full disk ended the run with a bare OSError traceback; now one DiskError saying what to free.
    with disk_errors.saving("the LoRA file", final_path, needed_bytes=len(blob)):
        return atomic_io.write_file_atomic(Path(final_path), blob, ops=ops)


# ---------------------------------------------------------------- state folders


def _versions() -> dict:
    import accelerate
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "fluxtrain_checkpoint": 1,
    }


def save_state_folder(
    final_dir,
    *,
    accelerator,
    output_name: str,
    step: int,
    epoch: int,
    data_position: dict,
    resume_settings: dict,
    args_digest: str,
    current_epoch_1based: int,
    run_id: int | None = None,
    ops: atomic_io.FsOps | None = None,
    extra: dict | None = None,
) -> Path:
    """Write an upstream-layout state folder under a temp name and publish it complete (manifest last)."""
    final_dir = Path(final_dir)
    needed = lambda: estimate_state_bytes(accelerator)  # noqa: E731 -- only computed when a write failed
    # FIX: a full disk during a state save said "RuntimeError: [enforce fail at inline_container.cc:672] .
    # unexpected pos ..." (torch's zip writer drops errno); now one DiskError, the previous state intact.
    with disk_errors.saving("the training state", final_dir, needed_bytes=needed), \
            atomic_io.atomic_dir(final_dir, ops=ops) as stage:
        with disk_errors.hidden_errno(stage.path, needed_bytes=needed):  # judged before the temp folder goes
            accelerator.save_state(str(stage.path), safe_serialization=True)
        inject_point("save")  # hang tests: a save stuck after the temp folder exists
        stage.write_json(TRAIN_STATE_NAME, {"current_epoch": int(current_epoch_1based), "current_step": int(step)})
        stage.set_manifest(
            {
                "format": MANIFEST_FORMAT,
                "version": 1,
                "kind": "state",
                "output_name": output_name,
                "step": int(step),
                "epoch": int(epoch),
                "data_position": {k: int(v) for k, v in data_position.items()},
                "versions": _versions(),
                "args_digest": args_digest,  # the run's settings hash
                "run_id": run_id,
                "resume_settings": _jsonable(resume_settings),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                # what other modules record with a state (validation loss, tracker loss window); never core keys
                **{k: v for k, v in (extra or {}).items() if v},
            }
        )
    return final_dir


def estimate_state_bytes(accelerator) -> int:
    """About how many bytes `accelerator.save_state` writes: model tensors, optimizer state, a little more."""
    total = 256 * 1024  # scheduler, RNG states, train_state.json, manifest
    with contextlib.suppress(Exception):
        for model in getattr(accelerator, "_models", []):
            total += sum(t.numel() * t.element_size() for t in model.state_dict().values() if hasattr(t, "numel"))
        for opt in getattr(accelerator, "_optimizers", []):
            for state in opt.state_dict().get("state", {}).values():
                total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    return total


def _jsonable(d: dict) -> dict:
    # Compare what the manifest can hold: tuples become lists, paths strings, on both sides alike.
    return json.loads(json.dumps(d, default=str))


def check_resume_settings(saved: dict, current: dict, path: Path) -> list[str]:
    """Raise ResumeMismatchError for settings that differ; return warnings for settings only one side knows."""
    saved, current = _jsonable(saved), _jsonable(current)
    diffs = [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if diffs:
        lines = [f"{k}: checkpoint has {saved[k]!r}, this run has {current[k]!r}" for k in diffs]
        raise ResumeMismatchError(
            f"cannot resume from {path}: " + "; ".join(lines)
            + ". Use the same settings as the run that wrote it, or start a new run without --resume."
        )
    only = sorted(set(saved) ^ set(current))
    return [f"resume setting {k!r} is recorded on only one side; not checked" for k in only]


def _probe_rng(path: Path) -> list[str]:
    """Warnings about the RNG pickle that accelerate would otherwise swallow at INFO level."""
    from accelerate.utils import load as acc_load

    rng = path / RNG_FILE
    if not rng.is_file():
        return [f"{RNG_FILE} missing: random streams start fresh (augmentation/noise draws differ)"]
    try:
        states = acc_load(rng)  # weights_only with accelerate's numpy allow-list, as load_state does
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means the same thing here
        return [
            f"{RNG_FILE} could not be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "random streams start fresh (augmentation/noise draws differ), everything else is restored"
        ]
    if isinstance(states, dict) and "step" not in states:
        return [f"{RNG_FILE} has no 'step' (accelerate 0.32/0.33 era); step taken from the checkpoint instead"]
    return []


def load_state_folder(path, *, accelerator, resume_settings: dict) -> ResumeInfo:
    """Validate a state folder, check settings, restore it into `accelerator`.

    `warnings` lists what could not be restored or checked; the caller logs them (this function does not).
    """
    info = inspect_state_folder(path, resume_settings=resume_settings)
    restore_state_folder(info, accelerator=accelerator)
    return info


def inspect_state_folder(path, *, resume_settings: dict, validated: CheckpointInfo | None = None) -> ResumeInfo:
    """Everything about a resume target that needs no model: valid, settings match, step and data position.

    `validated`: the folder's CheckpointInfo when the caller has just validated it (not hashed twice).
    """
    path = Path(path)
    info: CheckpointInfo = validated if validated is not None and validated.valid else validate_state_dir(path)
    if not info.valid:
        raise CheckpointLoadError(
            f"--resume {path}: not a usable checkpoint ({info.reason}). "
            f"Run `python tools/find_checkpoint.py {path.parent}` to find the newest valid one."
        )
    warnings: list[str] = []
    if info.has_manifest:
        manifest = read_manifest(path)
        warnings += check_resume_settings(manifest.get("resume_settings") or {}, resume_settings, path)
        step, epoch = manifest["step"], int(manifest.get("epoch", 0))
        data_position = manifest.get("data_position")
        run_id = manifest.get("run_id") if isinstance(manifest.get("run_id"), int) else None
    else:
        ts = read_train_state(path)
        step = ts["current_step"]
        # upstream's current_epoch is the 1-based epoch in progress; completed epochs are one less at most
        epoch = max(int(ts.get("current_epoch", 1)) - 1, 0)
        data_position, run_id = None, None
        warnings.append(
            f"{path.name} has no {atomic_io.MANIFEST_NAME} (written by upstream sd-scripts?): settings not checked, "
            f"data position derived from step {step}"
        )
    warnings += _probe_rng(path)
    return ResumeInfo(step, epoch, data_position, warnings, info.has_manifest, path, run_id)


def restore_state_folder(info: ResumeInfo, *, accelerator) -> None:
    """Load an inspected state folder into `accelerator`; what could not be restored is added to info.warnings."""
    path, warnings = info.path, info.warnings
    try:
        accelerator.load_state(str(path))
    except KeyError as exc:
        if exc.args != ("step",):
            raise
        warnings.append("accelerate could not read its step counter; continuing with the checkpoint's step")
    except Exception as exc:  # noqa: BLE001 -- re-raised with the folder and what to do
        raise CheckpointLoadError(
            f"--resume {path}: accelerate could not load it ({type(exc).__name__}: {exc}). "
            "The network/optimizer settings must match the run that wrote it."
        ) from exc


# ---------------------------------------------------------------- rotation


def _prune(items: list[CheckpointInfo], keep: int, ops) -> list[Path]:
    """Delete valid items beyond the newest `keep` (items newest first); never the newest valid one."""
    valid = [c for c in items if c.valid]
    removed = []
    for c in valid[max(keep, 1) :]:
        atomic_io.remove_tree(c.path, ops=ops)
        removed.append(c.path)
    return removed


def _prune_steps(items: list[CheckpointInfo], keep_steps: int, ops) -> list[Path]:
    """Upstream semantics: keep step checkpoints within `keep_steps` steps of the newest valid one."""
    valid = [c for c in items if c.valid and c.step is not None]
    if not valid:
        return []
    floor = valid[0].step - keep_steps
    removed = []
    for c in valid[1:]:
        if c.step < floor:
            atomic_io.remove_tree(c.path, ops=ops)
            removed.append(c.path)
    return removed


def rotate(
    output_dir,
    output_name: str,
    *,
    last_n_epochs: int | None = None,
    last_n_epochs_state: int | None = None,
    last_n_steps: int | None = None,
    last_n_steps_state: int | None = None,
    ops: atomic_io.FsOps | None = None,
) -> list[Path]:
    """Apply --save_last_n_* after a save; only complete checkpoints count, final names are never touched."""
    output_dir = Path(output_dir)
    removed: list[Path] = []
    if last_n_epochs_state is None:
        last_n_epochs_state = last_n_epochs  # upstream falls back the same way
    if last_n_steps_state is None:
        last_n_steps_state = last_n_steps
    for kind, n_epochs, n_steps in (
        ("model", last_n_epochs, last_n_steps),
        ("state", last_n_epochs_state, last_n_steps_state),
    ):
        found = discover(output_dir, kind=kind, output_name=output_name, leftovers=False)
        if n_epochs:
            removed += _prune([c for c in found if c.label == "epoch"], n_epochs, ops)
        if n_steps:
            removed += _prune_steps([c for c in found if c.label == "step"], n_steps, ops)
    for p in removed:
        logger.info("removed old checkpoint %s", p)
    return removed
