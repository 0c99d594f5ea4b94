"""Run identity: which run an output folder is on, and keeping earlier runs' files apart (stdlib only).

Each fresh start is run N+1 of its output folder (N: the highest run id the folder has seen), with a random
token (two folders that both reached "run 3" still differ) and the hash of the settings a resume must share.
`OUTPUT_DIR/fluxtrain-runs.json` names the current run per output name; every checkpoint records its run (manifest
`run_id`, LoRA metadata `fluxtrain_run_id`). Before a run writes anything, the files of other runs under its
output name (state folders, LoRA files, sample images) move to `OUTPUT_DIR/runs/<id>/`: nothing is overwritten
and `--resume auto` can only find the run it continues. Call `begin_run` on the main process only, holding
the output-folder lock; other processes read the result with `read_run` once the main one has written it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
from pathlib import Path

from library import atomic_io
from library.checkpoint_validation import (
    RUN_FILE,
    RUN_ID_KEY,
    RUNS_DIR,
    CheckpointInfo,
    current_run,
    parse_name,
    parse_run_id,
    read_manifest,
    read_run_file,
    read_safetensors_header,
)

log = logging.getLogger(__name__)
RUN_FILE_FORMAT = "fluxtrain-runs"


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    run_id: int
    token: str  # random per fresh start
    settings_hash: str

    def describe(self) -> str:
        return f"run {self.run_id} (settings {self.settings_hash[:12]})"

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "token": self.token, "settings_hash": self.settings_hash}


@dataclasses.dataclass
class RunFile:
    """One file or folder of an output name found at the top of the output folder."""

    path: Path
    run_id: int | None  # None: written by upstream, an older trainer, or unknown


def run_files(output_dir: Path, output_name: str) -> list[RunFile]:
    """State folders and LoRA files named for `output_name`, with the run each one records (header reads only)."""
    found = []
    if not output_dir.is_dir():
        return found
    for entry in sorted(output_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        kind = "state" if entry.is_dir() else "model"
        parsed = parse_name(entry.name, kind)
        if not parsed or parsed[0] != output_name or (kind == "model" and not entry.is_file()):
            continue
        found.append(RunFile(entry, _recorded_run(entry, kind)))
    return found


def _recorded_run(path: Path, kind: str) -> int | None:
    try:
        if kind == "state":
            if not (path / atomic_io.MANIFEST_NAME).is_file():
                return None
            return parse_run_id(read_manifest(path).get("run_id"))
        header, _ = read_safetensors_header(path)
        return parse_run_id((header.get("__metadata__") or {}).get(RUN_ID_KEY))
    except (OSError, ValueError):
        return None  # unreadable: treated like an unnamed file (kept, moved with the previous run)


def sample_files(output_dir: Path, output_name: str) -> list[Path]:
    folder = output_dir / "sample"
    return sorted(folder.glob(f"{output_name}_*")) if folder.is_dir() else []


def archived_run_ids(output_dir: Path) -> list[int]:
    runs = output_dir / RUNS_DIR
    if not runs.is_dir():
        return []
    return sorted(int(p.name) for p in runs.iterdir() if p.is_dir() and p.name.isdigit())


def highest_run_id(output_dir: Path, files: list[RunFile]) -> int:
    recorded = read_run_file(output_dir)
    ids = [parse_run_id(recorded.get("last_run_id")) or 0, *archived_run_ids(output_dir)]
    ids += [f.run_id for f in files if f.run_id is not None]
    ids += [parse_run_id(r.get("run_id")) or 0 for r in recorded.get("runs", {}).values() if isinstance(r, dict)]
    return max(ids)


def begin_run(output_dir: Path, output_name: str, settings_hash: str, *,
              resume_from: CheckpointInfo | None) -> tuple[RunIdentity, list[str]]:
    """Decide this run's identity, move other runs' files to runs/<id>/, record the run in fluxtrain-runs.json.

    Returns the identity and the lines to print. Main process only, under the output-folder lock.
    """
    output_dir = Path(output_dir)
    files = run_files(output_dir, output_name)
    record = current_run(output_dir, output_name)
    top = highest_run_id(output_dir, files)
    unnamed = [f for f in files if f.run_id is None and (resume_from is None or f.path != resume_from.path)]
    if resume_from is None:
        # Files that name no run (and sample images) belong to the run before this one: the recorded one,
        # else a number of their own.
        samples = sample_files(output_dir, output_name)
        owner = int(record["run_id"]) if record else (top + 1 if unnamed or samples else None)
        top = max(top, owner or 0)
        identity = RunIdentity(top + 1, secrets.token_hex(8), settings_hash)
        moves = {f.path: (f.run_id if f.run_id is not None else owner) for f in files}
        moves.update({p: owner for p in samples})
        top = identity.run_id
    else:
        # Continuing: the state's own run, or (upstream/older state) the recorded run, else a new number.
        run_id = resume_from.run_id or (int(record["run_id"]) if record else top + 1)
        same = record is not None and int(record["run_id"]) == run_id and record.get("token")
        identity = RunIdentity(run_id, record["token"] if same else secrets.token_hex(8), settings_hash)
        moves = {f.path: f.run_id for f in files if f.run_id is not None and f.run_id != run_id
                 and f.path != resume_from.path}
        top = max(top, run_id)
    lines = _move_to_runs(output_dir, moves)
    _write_run_file(output_dir, output_name, identity, top, resumed=resume_from is not None)
    verb = "continues" if resume_from is not None else "starts"
    lines.insert(0, f"this {verb} {identity.describe()} of {output_dir} (recorded in {RUN_FILE}, every checkpoint "
                    "and LoRA file)")
    return identity, lines


def read_run(output_dir: Path, output_name: str, settings_hash: str) -> RunIdentity | None:
    """The identity the main process recorded (other processes, after it wrote fluxtrain-runs.json)."""
    record = current_run(output_dir, output_name)
    if record is None:
        return None
    return RunIdentity(int(record["run_id"]), str(record.get("token", "")), settings_hash)


def _move_to_runs(output_dir: Path, moves: dict[Path, int]) -> list[str]:
    by_run: dict[int, list[str]] = {}
    for src, run_id in sorted(moves.items()):
        dest_dir = output_dir / RUNS_DIR / str(run_id) / src.parent.relative_to(output_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / src.name
        if dest.exists():  # a name already archived for this run: keep both
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            dest = dest_dir / f"moved-{stamp}" / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        by_run.setdefault(run_id, []).append(str(src.relative_to(output_dir)))
    lines = []
    for run_id, names in sorted(by_run.items()):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"kept the files of run {run_id} apart: moved {shown} to "
                     f"{output_dir / RUNS_DIR / str(run_id)}{os.sep}")
    return lines


def _write_run_file(output_dir: Path, output_name: str, identity: RunIdentity, last_run_id: int, *,
                    resumed: bool) -> None:
    data = read_run_file(output_dir) or {"runs": {}}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    previous = data["runs"].get(output_name) if isinstance(data["runs"].get(output_name), dict) else {}
    same = previous.get("run_id") == identity.run_id
    data.update({"format": RUN_FILE_FORMAT, "version": 1, "last_run_id": last_run_id})
    data["runs"][output_name] = {**identity.as_dict(), "started": previous.get("started", now) if same else now,
                                 "last_start": now, "resumed": resumed}
    atomic_io.write_file_atomic(output_dir / RUN_FILE, json.dumps(data, indent=2, sort_keys=True).encode())


def archived_runs(output_dir: Path) -> list[dict]:
    """Earlier runs kept under runs/<id>/ (for find_checkpoint and status): id, folder, states, LoRA files."""
    out = []
    for run_id in archived_run_ids(Path(output_dir)):
        folder = Path(output_dir) / RUNS_DIR / str(run_id)
        entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        states = [p.name for p in entries if p.is_dir() and p.name.endswith("-state")]
        loras = [p.name for p in entries if p.is_file() and p.name.endswith(".safetensors")]
        out.append({"run_id": run_id, "path": str(folder), "states": states, "lora_files": loras})
    return out
