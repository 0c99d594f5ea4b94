"""What counts as a complete checkpoint, shared by the trainer and tools/find_checkpoint.py (stdlib only).

- Names: upstream state folders (`NAME-000004-state`, `NAME-step00000100-state`, `NAME-state`) and LoRA files.
- `validate_state_dir`: our manifest (sizes + sha256 of every file) or, for upstream folders, the required files
  intact (safetensors header vs size, `.bin` zip archives readable, `train_state.json` parses).
- `validate_lora_file`: header vs size, plus the `fluxtrain_data_sha256` metadata when present.
- `discover` / `newest_valid_state`: order by step (manifest, train_state.json, name), mtime only for ties.
- Runs: every checkpoint we write names its run (`run_id` in the manifest, `fluxtrain_run_id` in LoRA metadata);
  `OUTPUT_DIR/fluxtrain-runs.json` names the folder's current run per output name. `iter_valid_states` offers
  the current run's states first, then states that name no run (upstream or older trainers), never another run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

from library.atomic_io import MANIFEST_NAME, parse_leftover, sha256_file

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "fluxtrain-checkpoint"
DATA_SHA_KEY = "fluxtrain_data_sha256"
RUN_ID_KEY = "fluxtrain_run_id"  # LoRA metadata: the run that wrote the file (the manifest says `run_id`)
SETTINGS_HASH_KEY = "fluxtrain_settings_hash"  # LoRA metadata: hash of the settings a resume must share
RUN_FILE = "fluxtrain-runs.json"  # the folder's current run per output name (library.run_identity writes it)
RUNS_DIR = "runs"  # earlier runs' files, moved to runs/<id>/ when a new run starts
TRAIN_STATE_NAME = "train_state.json"
LORA_EXT = ".safetensors"
_EPOCH_STATE = re.compile(r"^(?P<name>.+)-(?P<num>\d{6,})-state$")
_STEP_STATE = re.compile(r"^(?P<name>.+)-step(?P<num>\d{8,})-state$")
_LAST_STATE = re.compile(r"^(?P<name>.+)-state$")
_EPOCH_FILE = re.compile(r"^(?P<name>.+)-(?P<num>\d{6,})\.safetensors$")
_STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<num>\d{8,})\.safetensors$")
_LAST_FILE = re.compile(r"^(?P<name>.+)\.safetensors$")
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointInfo:
    """One candidate checkpoint (a plain class: dataclasses would cost this stdlib-only module ~10 ms import)."""

    FIELDS = ("path", "kind", "output_name", "step", "epoch", "valid", "reason", "has_manifest", "mtime", "size",
              "label", "step_source", "run_id")
    __slots__ = FIELDS

    def __init__(self, path: Path, kind: str, output_name: str, step: int | None, epoch: int | None, valid: bool,
                 reason: str, has_manifest: bool, mtime: float, size: int, label: str = "", step_source: str = "",
                 run_id: int | None = None):
        self.path = path
        self.kind = kind  # "state" or "model"
        self.output_name = output_name
        self.step = step
        self.epoch = epoch  # manifest: epochs completed; upstream: train_state.json current_epoch as written
        self.valid = valid
        self.reason = reason  # why it is not valid ("" when valid)
        self.has_manifest = has_manifest
        self.mtime = mtime
        self.size = size
        self.label = label  # "epoch", "step", "last" or "leftover"
        self.step_source = step_source  # "manifest", "train_state.json", "metadata" or "name"
        self.run_id = run_id  # the run that wrote it; None for upstream-made or older checkpoints

    def to_json(self) -> dict:
        d = {f: getattr(self, f) for f in self.FIELDS}
        d["path"] = str(self.path)
        return d

    def __repr__(self) -> str:
        return "CheckpointInfo(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS) + ")"

    def __eq__(self, other) -> bool:
        return isinstance(other, CheckpointInfo) and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)


# ---------------------------------------------------------------- names


def state_dir_name(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}-state"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}-state"
    return f"{output_name}-state"


def lora_file_name(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}{LORA_EXT}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}{LORA_EXT}"
    return f"{output_name}{LORA_EXT}"


def parse_name(name: str, kind: str) -> tuple[str, str, int | None] | None:
    """`(output_name, label, number)` for a checkpoint name of `kind`, else None. Step pattern wins over epoch."""
    pats = (
        ((_STEP_STATE, "step"), (_EPOCH_STATE, "epoch"), (_LAST_STATE, "last"))
        if kind == "state"
        else ((_STEP_FILE, "step"), (_EPOCH_FILE, "epoch"), (_LAST_FILE, "last"))
    )
    for pat, label in pats:
        m = pat.match(name)
        if m:
            num = m.groupdict().get("num")
            return m["name"], label, int(num) if num is not None else None
    return None


# ---------------------------------------------------------------- file-level checks


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header; returns (header, data_start). Raises ValueError when inconsistent."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path.name}: header length {n} does not fit in a {size}-byte file (truncated?)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path.name}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: safetensors header is not a JSON object")
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path.name}: tensor {key!r} has no valid data_offsets") from None
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise ValueError(f"{path.name}: tensor {key!r} has bad data_offsets {meta['data_offsets']}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"{path.name}: tensors need {8 + n + end} bytes but the file has {size} (truncated?)")
    return header, 8 + n


def _data_sha256(path: Path, start: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_zip_archive(path: Path) -> None:
    """torch.save files are zip archives; a truncated or zero-tailed one loses its central directory or CRCs."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path.name}: not a readable archive ({exc})") from None
    if bad is not None:
        raise ValueError(f"{path.name}: member {bad} fails its CRC check")


def read_train_state(path: Path) -> dict:
    try:
        data = json.loads((path / TRAIN_STATE_NAME).read_text())
    except FileNotFoundError:
        raise ValueError(f"{TRAIN_STATE_NAME} missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{TRAIN_STATE_NAME} unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("current_step"), int):
        raise ValueError(f"{TRAIN_STATE_NAME} has no integer current_step")
    return data


def read_manifest(path: Path) -> dict:
    """The parsed checkpoint.json of a state folder; ValueError when it is garbled."""
    try:
        data = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"manifest {MANIFEST_NAME} unreadable ({exc})") from None
    ok = (
        isinstance(data, dict)
        and data.get("format") == MANIFEST_FORMAT
        and isinstance(data.get("step"), int)
        and isinstance(data.get("files"), dict)
    )
    if not ok:
        raise ValueError(f"manifest {MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest with step and files")
    return data


def verify_manifest_files(path: Path, manifest: dict) -> None:
    for rel, meta in sorted(manifest["files"].items()):
        f = path / rel
        if not f.is_file():
            raise ValueError(f"{rel} listed in the manifest is missing")
        size = f.stat().st_size
        if size != meta.get("size"):
            raise ValueError(f"{rel} is {size} bytes, manifest says {meta.get('size')}")
        if sha256_file(f) != meta.get("sha256"):
            raise ValueError(f"{rel} content does not match its manifest sha256 (corrupted or zero-filled)")


def _check_upstream_state(path: Path) -> dict:
    if (path / "model.safetensors").is_file():
        read_safetensors_header(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        check_zip_archive(path / "pytorch_model.bin")
    else:
        raise ValueError("model.safetensors (or pytorch_model.bin) missing")
    for name in ("optimizer.bin", "scheduler.bin"):
        if not (path / name).is_file():
            raise ValueError(f"{name} missing")
        check_zip_archive(path / name)
    return read_train_state(path)


# ---------------------------------------------------------------- validation


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _d, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _probe_state(path: Path) -> CheckpointInfo:
    """Name, step and epoch of a state folder without hashing anything (for ordering)."""
    parsed = parse_name(path.name, "state")
    output_name, label, num = parsed if parsed else (path.name, "", None)
    info = CheckpointInfo(path, "state", output_name, None, None, False, "", False, 0.0, 0, label)
    has_manifest = (path / MANIFEST_NAME).is_file()
    info.has_manifest = has_manifest
    info.mtime = (path / MANIFEST_NAME if has_manifest else path).stat().st_mtime
    info.size = _dir_size(path)
    try:
        if has_manifest:
            m = read_manifest(path)
            info.step, info.epoch, info.step_source = m["step"], m.get("epoch"), "manifest"
            info.run_id = parse_run_id(m.get("run_id"))
            return info
    except ValueError:
        pass  # garbled: fall through to weaker sources, validation reports it
    try:
        ts = read_train_state(path)
        info.step, info.step_source = ts["current_step"], TRAIN_STATE_NAME
        if isinstance(ts.get("current_epoch"), int):
            info.epoch = ts["current_epoch"]
        return info
    except ValueError:
        pass
    if label == "step":
        info.step, info.step_source = num, "name"
    elif label == "epoch":
        info.epoch, info.step_source = num, "name"
    return info


def _validate_probed_state(info: CheckpointInfo) -> CheckpointInfo:
    path = info.path
    try:
        if not path.is_dir():
            raise ValueError("not a folder")
        if info.has_manifest:
            manifest = read_manifest(path)
            listed = manifest["files"]
            if not ({"model.safetensors", "pytorch_model.bin"} & listed.keys()) or "optimizer.bin" not in listed:
                raise ValueError("manifest lists no model weights or no optimizer.bin")
            verify_manifest_files(path, manifest)
        else:
            _check_upstream_state(path)
        info.valid, info.reason = True, ""
    except ValueError as exc:
        info.valid, info.reason = False, str(exc)
    except OSError as exc:
        info.valid, info.reason = False, f"unreadable ({exc})"
    return info


def validate_state_dir(path: Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        return CheckpointInfo(path, "state", path.name, None, None, False, "not a folder", False, 0.0, 0)
    return _validate_probed_state(_probe_state(path))


def is_complete_staged(path: Path) -> bool:
    """For promoting an interrupted save's temp folder: only with our manifest (an upstream-style check would
    accept a temp folder whose data files are all written but whose manifest is not)."""
    info = validate_state_dir(path)
    return info.valid and info.has_manifest


def validate_lora_file(path: Path) -> CheckpointInfo:
    path = Path(path)
    parsed = parse_name(path.name, "model")
    output_name, label, num = parsed if parsed else (path.stem, "", None)
    info = CheckpointInfo(path, "model", output_name, None, None, False, "", False, 0.0, 0, label)
    try:
        st = path.stat()
        info.mtime, info.size = st.st_mtime, st.st_size
        header, data_start = read_safetensors_header(path)
        meta = header.get("__metadata__") or {}
        for key, attr in (("ss_steps", "step"), ("ss_epoch", "epoch")):
            if str(meta.get(key, "")).isdigit():
                setattr(info, attr, int(meta[key]))
        info.step_source = "metadata" if info.step is not None else ""
        info.run_id = parse_run_id(meta.get(RUN_ID_KEY))
        if info.step is None and label == "step":
            info.step, info.step_source = num, "name"
        if info.epoch is None and label == "epoch":
            info.epoch = num
        expected = meta.get(DATA_SHA_KEY)
        if expected is not None:
            info.has_manifest = True  # the embedded data hash plays the manifest's role
            if _data_sha256(path, data_start) != expected:
                raise ValueError(f"tensor data does not match {DATA_SHA_KEY} (corrupted or zero-filled)")
        info.valid = True
    except ValueError as exc:
        info.reason = str(exc)
    except OSError as exc:
        info.reason = f"unreadable ({exc})"
    return info


# ---------------------------------------------------------------- discovery


def _sort_key(info: CheckpointInfo):
    # Step decides; epoch only when no step is known; mtime only breaks ties.
    return (info.step is not None, info.step if info.step is not None else -1, info.epoch or -1, info.mtime)


def _leftover_info(path: Path, kind: str) -> CheckpointInfo | None:
    parsed = parse_leftover(path.name)
    if parsed is None:
        return None
    what, final_name, _pid = parsed
    is_state = not final_name.endswith(LORA_EXT)
    if (kind == "state") != is_state:
        return None
    named = parse_name(final_name, kind)
    st = path.lstat()
    reason = "leftover temporary folder of an interrupted save" if what == "tmp" else "leftover trash of a deletion"
    return CheckpointInfo(
        path, kind, named[0] if named else final_name, None, None, False, reason, False, st.st_mtime,
        _dir_size(path) if path.is_dir() else st.st_size, "leftover",
    )


def _candidates(output_dir: Path, kind: str, output_name: str | None, leftovers: bool) -> list[CheckpointInfo]:
    out = []
    if not output_dir.is_dir():
        return out
    for entry in sorted(output_dir.iterdir()):
        if entry.name.startswith("."):
            try:
                left = _leftover_info(entry, kind) if leftovers else None
            except OSError:
                continue
            if left and (output_name is None or left.output_name == output_name):
                out.append(left)
            continue
        try:
            if kind == "state" and entry.is_dir() and entry.name.endswith("-state"):
                info = _probe_state(entry)
            elif kind == "model" and entry.is_file() and entry.name.endswith(LORA_EXT):
                info = validate_lora_file(entry)
            else:
                continue
        except OSError:  # removed by a running trainer's rotation while we looked
            continue
        if output_name is None or info.output_name == output_name:
            out.append(info)
    return out


def discover(
    output_dir: Path, *, kind: str = "state", output_name: str | None = None, leftovers: bool = True
) -> list[CheckpointInfo]:
    """Every candidate of `kind` ("state" or "model"), validated, newest first; leftovers last, never valid."""
    if kind not in ("state", "model"):
        raise ValueError(f"kind must be 'state' or 'model', not {kind!r}")
    cands = _candidates(Path(output_dir), kind, output_name, leftovers)
    real = [c for c in cands if c.label != "leftover"]
    left = [c for c in cands if c.label == "leftover"]
    if kind == "state":
        real = [_validate_probed_state(c) for c in real]
    return sorted(real, key=_sort_key, reverse=True) + sorted(left, key=lambda c: c.mtime, reverse=True)


def parse_run_id(value) -> int | None:
    """A run id as recorded (int or digit string), else None."""
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() else None


def lora_run_id(path: Path) -> int | None:
    """The run that wrote a LoRA file (its `fluxtrain_run_id` metadata); None when unreadable or not recorded."""
    try:
        header, _ = read_safetensors_header(Path(path))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__")
    return parse_run_id(meta.get(RUN_ID_KEY)) if isinstance(meta, dict) else None


def archived_file(output_dir: Path, name: str, run_id: int) -> Path | None:
    """Where a fresh start moved run `run_id`'s file `name`: runs/<id>/<name>, or runs/<id>/moved-*/<name>
    when that name was taken (newest first); None when it is in neither."""
    run_dir = Path(output_dir) / RUNS_DIR / str(run_id)
    if (run_dir / name).exists():
        return run_dir / name
    moved = sorted(run_dir.glob(f"moved-*/{name}"), reverse=True) if run_dir.is_dir() else []
    return moved[0] if moved else None


def read_run_file(output_dir: Path) -> dict:
    """`fluxtrain-runs.json` of an output folder ({} when missing or garbled: the folder then has no current run)."""
    try:
        data = json.loads((Path(output_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("runs"), dict) else {}


def current_run(output_dir: Path, output_name: str | None) -> dict | None:
    """The record of the run `output_name` is on in this folder: {"run_id", "token", "settings_hash", ...}."""
    runs = read_run_file(output_dir).get("runs", {})
    if output_name is None:
        records = [r for r in runs.values() if isinstance(r, dict) and parse_run_id(r.get("run_id")) is not None]
        return max(records, key=lambda r: int(r["run_id"]), default=None)
    record = runs.get(output_name)
    return record if isinstance(record, dict) and parse_run_id(record.get("run_id")) is not None else None


def resumed_run(output_dir: Path, output_name: str | None, cands: list[CheckpointInfo]) -> tuple[int | None, str]:
    """Which run `--resume auto` continues, and why: the folder's current run (fluxtrain-runs.json); without
    that file the run that wrote the most recent checkpoint; None when no checkpoint names a run (upstream/older folders)."""
    record = current_run(output_dir, output_name)
    if record:
        return int(record["run_id"]), f"the current run of {Path(output_dir).name} ({RUN_FILE})"
    named = [c for c in cands if c.run_id is not None]
    if not named:
        return None, ""
    latest = max(named, key=lambda c: c.mtime)
    return latest.run_id, f"the run that wrote the most recent checkpoint ({latest.path.name}); no {RUN_FILE}"


def split_by_run(cands: list[CheckpointInfo], run_id: int | None) -> tuple[list, list]:
    """(resumable, other runs') for the folder's current run `run_id`, each newest first: that run's states, then
    states naming no run; with no current run, every candidate (what discovery offered before runs had ids)."""
    if run_id is None:
        return list(cands), []
    ours = [c for c in cands if c.run_id == run_id]
    unnamed = [c for c in cands if c.run_id is None]
    return ours + unnamed, [c for c in cands if c.run_id not in (None, run_id)]


def resume_candidates(output_dir: Path, output_name: str | None) -> tuple[list, list, int | None, str]:
    """State folders `--resume auto` may take, newest first and not yet validated (`validate_candidate`), the
    other runs' state folders it passes over, the run it continues and why (see `resumed_run`)."""
    cands = sorted(_candidates(Path(output_dir), "state", output_name, False), key=_sort_key, reverse=True)
    run_id, why = resumed_run(output_dir, output_name, cands)
    ours, others = split_by_run(cands, run_id)
    return ours, others, run_id, why


def validate_candidate(info: CheckpointInfo) -> CheckpointInfo:
    """Full validation (sizes and hashes) of a candidate from `resume_candidates`, in place."""
    return _validate_probed_state(info)


def iter_valid_states(output_dir: Path, output_name: str | None = None, log: bool = True):
    """Valid state folders of the run being continued, newest first (see `resume_candidates`), validated lazily;
    each invalid one passed over is logged with its reason. The trainer's `--resume auto`, `fluxgym resume`,
    find_checkpoint and the monitor all pick through here, so they agree.
    """
    for info in resume_candidates(output_dir, output_name)[0]:
        _validate_probed_state(info)
        if info.valid:
            yield info
        elif log:
            logger.warning("skipping checkpoint %s: %s", info.path, info.reason)


def newest_valid_state(output_dir: Path, output_name: str | None = None, log: bool = True) -> CheckpointInfo | None:
    """The newest state folder that validates; each newer one skipped is logged with its reason."""
    return next(iter_valid_states(output_dir, output_name, log), None)


def newest_valid_model(output_dir: Path, output_name: str | None = None, log: bool = True) -> CheckpointInfo | None:
    for info in discover(output_dir, kind="model", output_name=output_name, leftovers=False):
        if info.valid:
            return info
        if log:
            logger.warning("skipping LoRA file %s: %s", info.path, info.reason)
    return None
