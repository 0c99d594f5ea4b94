"""Crash-safe publication of checkpoint folders and files (stdlib only).

- `atomic_dir(final)` stages a folder under `.<final>.tmp-<pid>-<8hex>` in the same parent, fsyncs every file,
  writes the manifest last, renames it into place and fsyncs the parent; an existing final is moved to
  `.<final>.trash-<8hex>` first and deleted only after the new one is in place.
- `atomic_file(final)` does the same for a single file (`os.replace`, no trash needed).
- `remove_tree(path)` deletes by rename-to-trash then delete, so a crash never leaves a half-deleted final name.
- `cleanup_leftovers(output_dir)` removes temp/trash names left by a killed run (or promotes a complete one).
- `read_json_object(path)` reads such a published JSON record back (None when missing or not an object).
- Every filesystem mutation goes through one `FsOps` object so tests can stop the sequence at operation N.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint.json"
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<pid>\d+)-(?P<nonce>[0-9a-f]{8})$")
_TRASH_RE = re.compile(r"^\.(?P<final>.+)\.trash-(?P<nonce>[0-9a-f]{8})$")
_HASH_CHUNK = 1 << 20


class FsCrash(BaseException):
    """Raised by a test FsOps to simulate the process dying at an operation.

    A BaseException so that no `except Exception` cleanup runs, exactly like a real kill.
    """


class FsOps:
    """The filesystem mutations used here; replace `fs_ops` (or pass `ops=`) to observe or abort them."""

    def tick(self, op: str, path: Path) -> None:
        """Called before every operation; the default does nothing."""

    def mkdir(self, path: Path) -> None:
        self.tick("mkdir", path)
        os.mkdir(path)

    def write_bytes(self, path: Path, data: bytes) -> None:
        self.tick("write", path)
        with open(path, "wb") as fh:
            fh.write(data)

    def fsync_file(self, path: Path) -> None:
        self.tick("fsync", path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())

    def fsync_dir(self, path: Path) -> None:
        self.tick("fsync_dir", path)
        if os.name == "nt":  # directories cannot be opened for fsync on Windows; rely on manifest checksums
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self.tick("rename", src)
        os.rename(src, dst)

    def replace(self, src: Path, dst: Path) -> None:
        self.tick("replace", src)
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        self.tick("unlink", path)
        os.unlink(path)

    def rmdir(self, path: Path) -> None:
        self.tick("rmdir", path)
        os.rmdir(path)


class CountingFsOps(FsOps):
    """Counts operations and raises FsCrash at operation number `crash_at` (1-based); for crash-point tests."""

    def __init__(self, crash_at: int | None = None, *, real_fsync: bool = True):
        self.crash_at = crash_at
        self.real_fsync = real_fsync  # False: count fsyncs but skip them (fast tests; no power loss simulated)
        self.count = 0
        self.log: list[tuple[str, str]] = []

    def tick(self, op: str, path: Path) -> None:
        self.count += 1
        self.log.append((op, str(path)))
        if self.crash_at is not None and self.count >= self.crash_at:
            raise FsCrash(f"simulated crash at op {self.count}: {op} {path}")

    def write_bytes(self, path: Path, data: bytes) -> None:
        if self.crash_at is not None and self.count + 1 >= self.crash_at:
            # A torn write: half the bytes reach the file before the "process" dies.
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
        super().write_bytes(path, data)

    def fsync_file(self, path: Path) -> None:
        if self.real_fsync:
            return super().fsync_file(path)
        self.tick("fsync", path)

    def fsync_dir(self, path: Path) -> None:
        if self.real_fsync:
            return super().fsync_dir(path)
        self.tick("fsync_dir", path)


fs_ops: FsOps = FsOps()


def _ops(ops: FsOps | None) -> FsOps:
    return ops if ops is not None else fs_ops


def temp_name(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def trash_name(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.trash-{os.urandom(4).hex()}")


def parse_leftover(name: str) -> tuple[str, str, int | None] | None:
    """`(kind, final_name, pid)` for a temp/trash name, kind "tmp" or "trash"; None for any other name."""
    m = _TMP_RE.match(name)
    if m:
        return "tmp", m["final"], int(m["pid"])
    m = _TRASH_RE.match(name)
    if m:
        return "trash", m["final"], None
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under root, sorted (the manifest's file list)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def file_table(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, dict]:
    return {
        rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in list_files(root)
        if rel not in exclude
    }


class StagedDir:
    """Handle yielded by `atomic_dir`: write into `.path`; the manifest set here is completed and written last."""

    def __init__(self, path: Path, ops: FsOps):
        self.path = path
        self._ops = ops
        self.manifest: dict | None = None

    def write_bytes(self, relpath: str, data: bytes) -> Path:
        target = self.path / relpath
        self._ops.write_bytes(target, data)
        return target

    def write_json(self, relpath: str, obj) -> Path:
        return self.write_bytes(relpath, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def set_manifest(self, manifest: dict) -> None:
        """The manifest body; `files` (size + sha256 of everything staged) is filled in at commit."""
        self.manifest = dict(manifest)


def _fsync_tree(root: Path, ops: FsOps) -> None:
    for rel in list_files(root):
        ops.fsync_file(root / rel)
    for dirpath, dirs, _files in os.walk(root, topdown=False):
        for d in dirs:
            ops.fsync_dir(Path(dirpath, d))
    ops.fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(final: Path, *, ops: FsOps | None = None, manifest_name: str = MANIFEST_NAME) -> Iterator[StagedDir]:
    """Stage a folder and publish it at `final` only once it is complete (manifest last, then rename)."""
    # FIX: upstream writes state folders in place, so a kill mid-save left a half folder that resume picked.
    ops = _ops(ops)
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)  # the output folder itself needs no atomicity
    tmp = temp_name(final)
    ops.mkdir(tmp)
    stage = StagedDir(tmp, ops)
    try:
        yield stage
        _fsync_tree(tmp, ops)  # data durable before the manifest can claim it is
        if stage.manifest is not None:
            body = dict(stage.manifest)
            body["files"] = file_table(tmp, exclude=(manifest_name,))
            stage.write_json(manifest_name, body)
            ops.fsync_file(tmp / manifest_name)
            ops.fsync_dir(tmp)
        _publish(tmp, final, ops)
    except FsCrash:
        raise  # a simulated kill: leave everything as a dead process would
    except BaseException:
        _discard(tmp, ops)
        raise


def _publish(tmp: Path, final: Path, ops: FsOps) -> None:
    trash = None
    if final.exists():
        # Directories cannot be replaced in one rename; park the old one under a name discovery ignores.
        trash = trash_name(final)
        ops.rename(final, trash)
    ops.rename(tmp, final)
    ops.fsync_dir(final.parent)
    if trash is not None:
        _delete_tree(trash, ops)


@contextlib.contextmanager
def atomic_file(final: Path, *, ops: FsOps | None = None) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced and `os.replace`d onto `final`."""
    ops = _ops(ops)
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        ops.fsync_file(tmp)
        ops.replace(tmp, final)
        ops.fsync_dir(final.parent)
    except FsCrash:
        raise
    except BaseException:
        _discard(tmp, ops)
        raise


def read_json_object(path: Path) -> dict | None:
    """A JSON object file written by one of the writers here (heartbeat, lock record, pid file, run record), or
    None when it is missing, unreadable, not JSON or not an object: every caller treats those the same."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_file_atomic(final: Path, data: bytes, *, ops: FsOps | None = None) -> Path:
    ops = _ops(ops)
    with atomic_file(final, ops=ops) as tmp:
        ops.write_bytes(tmp, data)
    return Path(final)


def _delete_tree(path: Path, ops: FsOps) -> None:
    if path.is_symlink() or path.is_file():
        ops.unlink(path)
        return
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in files:
            ops.unlink(Path(dirpath, name))
        for name in dirs:
            sub = Path(dirpath, name)
            ops.unlink(sub) if sub.is_symlink() else ops.rmdir(sub)
    ops.rmdir(path)


def _discard(path: Path, ops: FsOps) -> None:
    try:
        if path.exists() or path.is_symlink():
            _delete_tree(path, ops)
    except OSError as exc:  # best effort: cleanup_leftovers gets it at the next start
        logger.warning("could not remove temporary %s: %s", path, exc)


def delete_tree(path: Path, *, ops: FsOps | None = None) -> None:
    """Delete a file or folder bottom-up (for names discovery already ignores: temps and trash)."""
    _delete_tree(Path(path), _ops(ops))


def remove_tree(path: Path, *, ops: FsOps | None = None) -> None:
    """Delete a checkpoint folder or file so that its final name vanishes in one rename."""
    ops = _ops(ops)
    path = Path(path)
    trash = trash_name(path)
    ops.rename(path, trash)
    ops.fsync_dir(path.parent)
    _delete_tree(trash, ops)


def pid_alive(pid: int) -> bool:
    """Whether another live process has this pid (our own pid counts as dead: a leftover of an earlier life)."""
    if pid == os.getpid():
        return False  # our own leftovers can only be from a previous life of this pid
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows; keep its files
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def cleanup_leftovers(
    output_dir: Path,
    *,
    ops: FsOps | None = None,
    is_complete: Callable[[Path], bool] | None = None,
    skip_live: bool = True,
) -> list[Path]:
    """Remove `.*.tmp-*` / `.*.trash-*` names in output_dir; return what was removed.

    With `is_complete`, a complete staged folder whose final name is missing (killed between the two renames of
    a replacement) is renamed into place instead of deleted. Temps of a live process (by pid) are left alone.
    """
    ops = _ops(ops)
    output_dir = Path(output_dir)
    removed: list[Path] = []
    if not output_dir.is_dir():
        return removed
    for entry in sorted(output_dir.iterdir()):
        parsed = parse_leftover(entry.name)
        if parsed is None:
            continue
        kind, final_name, pid = parsed
        if kind == "tmp" and skip_live and pid is not None and pid_alive(pid):
            logger.info("leaving %s alone: process %d is still running", entry, pid)
            continue
        final = output_dir / final_name
        if kind == "tmp" and is_complete is not None and not final.exists() and is_complete(entry):
            ops.rename(entry, final)
            ops.fsync_dir(output_dir)
            logger.warning("recovered complete checkpoint %s from interrupted save", final)
            continue
        logger.warning("removing leftover from an interrupted save: %s", entry)
        _delete_tree(entry, ops)
        removed.append(entry)
    return removed
