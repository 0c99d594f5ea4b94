"""The job store's schema: the SQL of each version (`MIGRATIONS`) and the `Job` row it holds.

`MIGRATIONS[n]` takes a store from schema version n to n + 1 (`PRAGMA user_version`); append, never edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from fluxgym.jobs.states import ACTIVE_STATES

_SCHEMA_V1 = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lora TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT,
    launch TEXT NOT NULL,
    argv TEXT NOT NULL,
    settings TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    log_file TEXT,
    events_file TEXT,
    events_offset INTEGER NOT NULL DEFAULT 0,
    resume_from TEXT,
    stop_requested REAL,
    pid INTEGER,
    pgid INTEGER,
    create_time REAL,
    worker_pid INTEGER,
    gpu TEXT,
    blocks_to_swap INTEGER,
    restarts INTEGER NOT NULL DEFAULT 0,
    restart_reasons TEXT NOT NULL DEFAULT '[]',
    step INTEGER,
    total_steps INTEGER,
    epoch INTEGER,
    it_per_s REAL,
    eta_s REAL,
    last_checkpoint TEXT,
    last_checkpoint_step INTEGER,
    lora_file TEXT,
    error TEXT,
    hint TEXT,
    error_lines TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    queued REAL,
    started REAL,
    finished REAL,
    updated REAL NOT NULL
);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    old TEXT NOT NULL,
    new TEXT NOT NULL,
    why TEXT,
    time REAL NOT NULL
);
"""
# Index n: the SQL that takes a store from schema version n to n + 1. Append, never edit.
MIGRATIONS: list[str] = [_SCHEMA_V1]
SCHEMA_VERSION = len(MIGRATIONS)

JSON_FIELDS = ("launch", "argv", "settings", "restart_reasons", "error_lines")
# What `update` may write: progress and bookkeeping, never `state`.
PROGRESS_FIELDS = frozenset({
    "phase", "pid", "pgid", "create_time", "worker_pid", "gpu", "blocks_to_swap", "restarts", "restart_reasons",
    "step", "total_steps", "epoch", "it_per_s", "eta_s", "last_checkpoint", "last_checkpoint_step", "lora_file",
    "error", "hint", "error_lines", "stop_requested", "resume_from",
})



@dataclass
class Job:
    """One row of the store, JSON columns decoded."""

    id: int
    lora: str
    name: str
    state: str
    created: float
    updated: float
    output_dir: str
    launch: list = field(default_factory=list)  # the command the worker runs (job's script snapshot)
    argv: list = field(default_factory=list)  # the full generated trainer command, for the record
    settings: dict = field(default_factory=dict)  # the generate options and run.json at submit time
    phase: str | None = None
    log_file: str | None = None
    events_file: str | None = None
    events_offset: int = 0
    resume_from: str | None = None  # what the next launch passes as --resume ("auto" or a state folder)
    stop_requested: float | None = None
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None
    worker_pid: int | None = None
    gpu: str | None = None
    blocks_to_swap: int | None = None
    restarts: int = 0
    restart_reasons: list = field(default_factory=list)
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    lora_file: str | None = None
    error: str | None = None
    hint: str | None = None
    error_lines: list = field(default_factory=list)
    queued: float | None = None
    started: float | None = None
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict:
        """The JSON shape `queue list --json` and the web UI read (engine.md section 2)."""
        keys = ("id", "lora", "state", "phase", "step", "total_steps", "epoch", "it_per_s", "eta_s",
                "last_checkpoint", "last_checkpoint_step", "lora_file", "restarts", "restart_reasons", "error",
                "hint", "created", "started", "finished", "argv", "settings", "output_dir", "log_file",
                "events_file", "events_offset", "gpu", "blocks_to_swap", "pid")
        d = {k: getattr(self, k) for k in keys}
        d.update(name=self.name, queued=self.queued, error_lines=self.error_lines, resume_from=self.resume_from,
                 stop_requested=self.stop_requested is not None, launch=self.launch)
        return d


COLUMNS = tuple(f.name for f in fields(Job))
