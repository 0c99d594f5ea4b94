"""The job store: one SQLite file (`outputs/.fluxgym/jobs.sqlite3`, WAL) holding every queued and past job.

- One transaction per state change, through `transition` and the table in states.py; `update` writes
  progress fields only. Every transition is also logged in the `transitions` table.
- After each successful transition the whole store is copied to `jobs.sqlite3.bak` (SQLite's online
  backup, written to a temp file and renamed), so a damaged file loses no job: `queue repair` restores it.
- Errors (damaged, locked, disk full) are `StoreError`s naming the file and what to do.
- The schema (schema.py) has a version (`PRAGMA user_version`) and a migration path (`MIGRATIONS`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fluxgym.jobs import schema
from fluxgym.jobs.schema import COLUMNS, JSON_FIELDS, PROGRESS_FIELDS, Job
from fluxgym.jobs.states import ACTIVE_STATES, check_transition

log = logging.getLogger(__name__)

STORE_DIR = Path("outputs") / ".fluxgym"
DB_NAME = "jobs.sqlite3"
BACKUP_SUFFIX = ".bak"
# Test hook: after N successful writes in this process, every write fails like a full disk does.
INJECT_FULL_ENV = "FLUXGYM_INJECT_STORE_FULL"


class StoreError(RuntimeError):
    """The job store cannot be used; the message names the file and what to do."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


class StoreCorruptError(StoreError):
    """The database file is damaged or not a database."""


class StoreLockedError(StoreError):
    """Another program holds a lock on the database longer than the timeout."""


class StoreFullError(StoreError):
    """The disk (or the database size limit) is full."""


def _classify(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """Turn a sqlite3 error into a StoreError that says what happened to which file and what to do."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StoreLockedError(
            f"the job store {path} is locked by another program (while {doing}); close whatever holds it open "
            f"(a database browser, a stuck fluxgym process) and try again. Nothing was changed.", path)
    if "full" in text or getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return StoreFullError(
            f"disk full while {doing} in the job store {path}; free space on that disk and try again. The "
            f"last recorded state is kept, and training outputs in {path.parent.parent} are not affected.", path)
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    where = (f"a backup of every job as of the last state change is in {backup}" if backup.is_file()
             else "no backup exists yet")
    return StoreCorruptError(
        f"the job store {path} is damaged ({exc}) while {doing}; {where}. Run `python -m fluxgym queue repair` "
        f"to move the damaged file aside and restore the backup. Training outputs are not affected.", path)


class JobStore:
    """Jobs in SQLite; one connection per thread (the worker's run threads write their own progress)."""

    def __init__(self, path: Path, *, timeout: float = 10.0, backup: bool = True):
        self.path = Path(path)
        self.backup_path = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        self.timeout = timeout
        self.backup_enabled = backup
        self._local = threading.local()
        self._backup_lock = threading.Lock()
        self._backup_warned = False
        self._writes = 0
        inject = os.environ.get(INJECT_FULL_ENV, "").strip()
        self._full_after = int(inject) if inject.isdigit() else None

    # ------------------------------------------------------------ opening

    @classmethod
    def path_for(cls, root: str | Path) -> Path:
        return Path(root).resolve() / STORE_DIR / DB_NAME

    @classmethod
    def open(cls, root: str | Path, *, timeout: float = 10.0, backup: bool = True) -> "JobStore":
        """The store of the project at `root`, created or migrated as needed and checked for damage."""
        path = cls.path_for(root)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the job store folder {path.parent}: {exc}", path) from None
        store = cls(path, timeout=timeout, backup=backup)
        store._setup()
        return store

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=True)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = self._connect()
                c.execute("PRAGMA journal_mode = WAL")
                c.execute("PRAGMA synchronous = FULL")  # a transition that returned survives a power cut
            except sqlite3.Error as exc:
                raise _classify(exc, self.path, "opening it") from None
            self._local.conn = c
        return c

    def _setup(self) -> None:
        try:
            conn = self.conn
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > schema.SCHEMA_VERSION:
                raise StoreError(
                    f"the job store {self.path} has schema version {version}, newer than this fluxgym knows "
                    f"({schema.SCHEMA_VERSION}); update fluxgym (git pull) before using it.", self.path)
            if version < schema.SCHEMA_VERSION:
                self._migrate(conn, version)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
        except sqlite3.Error as exc:
            self.close()
            raise _classify(exc, self.path, "opening it") from None

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated meanwhile.
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for n in range(current, schema.SCHEMA_VERSION):
                for statement in schema.MIGRATIONS[n].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {n + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if current == 0:
            log.info("created the job store %s (schema version %d)", self.path, schema.SCHEMA_VERSION)
        elif current < schema.SCHEMA_VERSION:
            log.info("migrated the job store %s from schema version %d to %d", self.path, current,
                     schema.SCHEMA_VERSION)

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # ------------------------------------------------------------ reading

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        data = {k: row[k] for k in COLUMNS}
        for k in JSON_FIELDS:
            data[k] = json.loads(data[k]) if data[k] else ([] if k != "settings" else {})
        return Job(**data)

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _classify(exc, self.path, "reading it") from None

    def get(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (int(job_id),))
        return self._job(rows[0]) if rows else None

    def list(self, states: tuple[str, ...] | None = None) -> list[Job]:
        """Newest first."""
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id DESC", tuple(states))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id DESC")
        return [self._job(r) for r in rows]

    def next_queued(self, skip_loras: set[str] = frozenset()) -> Job | None:
        """The job that has waited longest (queue order: when it was last queued, then id)."""
        for row in self._query("SELECT * FROM jobs WHERE state = 'queued' ORDER BY queued, id"):
            if row["lora"] not in skip_loras:
                return self._job(row)
        return None

    def history(self, job_id: int) -> list[tuple[str, str, str | None]]:
        """(old, new, why) of every transition of a job, oldest first."""
        rows = self._query("SELECT old, new, why FROM transitions WHERE job = ? ORDER BY id", (int(job_id),))
        return [(r["old"], r["new"], r["why"]) for r in rows]

    # ------------------------------------------------------------ writing

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _classify(exc, self.path, doing) from None
        try:
            yield conn
            if self._full_after is not None and self._writes >= self._full_after:
                raise sqlite3.OperationalError("database or disk is full (injected by FLUXGYM_INJECT_STORE_FULL)")
            conn.execute("COMMIT")
            self._writes += 1
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise _classify(exc, self.path, doing) from None
        except BaseException:
            self._rollback(conn)
            raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # already rolled back by SQLite (disk full does that)

    @staticmethod
    def _encode(values: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in values.items():
            if k not in COLUMNS or k == "id":
                raise ValueError(f"unknown job field {k!r}")
            out[k] = json.dumps(v) if k in JSON_FIELDS else (str(v) if isinstance(v, Path) else v)
        return out

    def add(self, *, lora: str, name: str, launch: list, argv: list, settings: dict, output_dir: str,
            before_commit=None, **extra) -> Job:
        """Insert a queued job. `before_commit(job_id)` runs inside the transaction (e.g. to snapshot files)."""
        now = time.time()
        values = self._encode(dict(lora=lora, name=name, state="queued", launch=launch, argv=argv,
                                   settings=settings, output_dir=output_dir, created=now, queued=now,
                                   updated=now, **extra))
        cols = ", ".join(values)
        with self._write("adding a job") as c:
            cur = c.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(values))})",
                            tuple(values.values()))
            job_id = cur.lastrowid
            c.execute("INSERT INTO transitions (job, old, new, why, time) VALUES (?, '', 'queued', 'added', ?)",
                      (job_id, now))
            if before_commit is not None:
                before_commit(job_id)
        self._backup()
        return self.get(job_id)

    def transition(self, job_id: int, new_state: str, *, why: str | None = None, **fields_: Any) -> Job:
        """The only way a job's state changes. Illegal changes raise IllegalTransition (see states.py)."""
        now = time.time()
        values = self._encode(fields_)
        with self._write(f"moving job {job_id} to {new_state}") as c:
            row = c.execute("SELECT state, started FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id} in {self.path}")
            old = row["state"]
            check_transition(job_id, old, new_state)
            values.update(state=new_state, updated=now)
            if new_state == "queued":
                values.setdefault("queued", now)
                values.update(finished=None, stop_requested=None)
            elif new_state == "running" and old == "queued":
                values.setdefault("started", now)
            elif new_state in ("done", "failed", "stopped", "interrupted"):
                values.setdefault("finished", now)
            sets = ", ".join(f"{k} = ?" for k in values)
            c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), int(job_id)))
            c.execute("INSERT INTO transitions (job, old, new, why, time) VALUES (?, ?, ?, ?, ?)",
                      (int(job_id), old, new_state, why, now))
        self._backup()
        return self.get(job_id)

    def update(self, job_id: int, **fields_: Any) -> Job:
        """Progress and bookkeeping fields (never `state`: that goes through `transition`)."""
        bad = set(fields_) - PROGRESS_FIELDS
        if bad:
            raise ValueError(f"update() cannot write {sorted(bad)}; a state change goes through transition()")
        values = self._encode(fields_)
        values["updated"] = time.time()
        with self._write(f"updating job {job_id}") as c:
            sets = ", ".join(f"{k} = ?" for k in values)
            cur = c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), int(job_id)))
            if cur.rowcount == 0:
                raise KeyError(f"no job {job_id} in {self.path}")
        return self.get(job_id)

    def delete(self, job_id: int) -> None:
        with self._write(f"deleting job {job_id}") as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id} in {self.path}")
            if row["state"] in ACTIVE_STATES:
                raise ValueError(f"job {job_id} is {row['state']}; cancel it before deleting it")
            c.execute("DELETE FROM jobs WHERE id = ?", (int(job_id),))
            c.execute("INSERT INTO transitions (job, old, new, why, time) VALUES (?, ?, '', 'deleted', ?)",
                      (int(job_id), row["state"], time.time()))
        self._backup()

    # ------------------------------------------------------------ backup and repair

    def _backup(self) -> None:
        """Copy the whole store to jobs.sqlite3.bak (temp file + rename: a crash mid-copy keeps the old one)."""
        if not self.backup_enabled:
            return
        tmp = self.backup_path.with_name(f".{self.backup_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with self._backup_lock:
            try:
                dst = sqlite3.connect(tmp)
                try:
                    self.conn.backup(dst)
                finally:
                    dst.close()
                os.replace(tmp, self.backup_path)
                self._backup_warned = False
            except (sqlite3.Error, OSError) as exc:
                tmp.unlink(missing_ok=True)
                if not self._backup_warned:  # the store itself was written; say so once, not every second
                    log.warning("could not update the job store backup %s: %s", self.backup_path, exc)
                    self._backup_warned = True


def repair(root: str | Path) -> tuple[Path | None, int]:
    """Move a damaged store aside and restore the backup. Returns (where the damaged file went, jobs restored)."""
    path = JobStore.path_for(root)
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if backup.is_file():
        try:
            probe = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
            try:
                ok = probe.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                count = probe.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] if ok else 0
            finally:
                probe.close()
        except sqlite3.Error:
            ok, count = False, 0
        if not ok:
            raise StoreCorruptError(f"the backup {backup} is damaged too; move {path} aside by hand and start "
                                    "a new queue (training outputs are not affected)", path)
    moved = None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = path.with_name(path.name + suffix)
        if p.exists():
            dest = p.with_name(f"{path.name}.damaged-{stamp}{suffix}")
            os.replace(p, dest)
            moved = moved or dest
    if backup.is_file():
        tmp = path.with_name(f".{path.name}.restore-{os.getpid()}")
        shutil.copyfile(backup, tmp)
        os.replace(tmp, path)
        return moved, count
    return moved, 0

