"""Heartbeat file: where the trainer is, written so a monitor can read it at any moment.

Responsibilities: keep the current phase/step/epoch (and the last loss) in memory, write it to
`OUTPUT_DIR/heartbeat.json` atomically (temp file + os.replace) on every phase change and step,
and read it back for tools. Every rank writes its own file: global rank 0 `heartbeat.json`, rank N
`heartbeat-rank<N>.json`, so a supervisor on any machine can see each of its ranks move. Stdlib only (the
monitor imports it); I/O errors are logged once and never raised, because losing a heartbeat must never stop training.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from library.atomic_io import read_json_object

logger = logging.getLogger(__name__)

FILE_NAME = "heartbeat.json"
RANK_FILE_NAME = "heartbeat-rank{rank}.json"  # global ranks other than 0
VERSION = 1
# `stopped`: ended by a signal (or by its launcher's death); `signal` then names it, e.g. "SIGTERM".
PHASES = ("loading", "caching_latents", "caching_text", "training", "sampling", "saving", "done", "failed",
          "stopped")


class Heartbeat:
    """Writes `heartbeat.json`; every public method updates the state and replaces the file.

    Only call it from progress points of the training loop itself (not a background timer): a
    heartbeat that keeps beating while the loop is stuck would hide the hang from a monitor.
    `min_interval` (seconds) lets step() skip writes when steps are very fast; phase changes,
    checkpoints, failed() and done() always write.
    """

    def __init__(self, output_dir: str | os.PathLike, *, pid: int | None = None, min_interval: float = 0.0,
                 rank: int = 0):
        self.path = Path(output_dir) / file_name_for_rank(rank)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):  # left by a run killed mid-write
                stale.unlink()
        except OSError:
            pass  # reported by the first write instead
        self._min_interval = float(min_interval)
        self._lock = threading.Lock()  # the hang watchdog may call failed() from its own thread
        self._warned = False
        self._last_write = 0.0
        now = time.time()
        self._state: dict[str, Any] = {
            "version": VERSION,
            "pid": int(pid if pid is not None else os.getpid()),
            "rank": int(rank),
            "phase": "loading",
            "step": 0,
            "total_steps": 0,
            "epoch": 0,
            "total_epochs": 0,
            "time": now,
            "phase_started": now,
            "last_checkpoint": None,
            "loss": None,
            "message": "",
            "run_id": None,
            "settings_hash": None,
        }

    # -- state updates -------------------------------------------------------------------------
    def set_totals(self, total_steps: int, total_epochs: int) -> None:
        self._update(total_steps=int(total_steps), total_epochs=int(total_epochs))

    def phase(self, name: str, message: str = "") -> None:
        if name not in PHASES:
            raise ValueError(f"heartbeat phase {name!r} is not one of {', '.join(PHASES)}")
        self._update(phase=name, phase_started=time.time(), message=message)

    def step(self, step: int, epoch: int, loss: float | None = None) -> None:
        changes: dict[str, Any] = {"step": int(step), "epoch": int(epoch)}
        if loss is not None:
            changes["loss"] = float(loss)  # the step's own loss, for UIs that plot it without the console
        self._update(_throttle=True, **changes)

    def identify(self, run_id: int, settings_hash: str) -> None:
        """The run this trainer continues or starts (library.run_identity), so a monitor can tell runs apart."""
        self._update(run_id=int(run_id), settings_hash=str(settings_hash))

    def checkpoint(self, path: str | os.PathLike) -> None:
        self._update(last_checkpoint=str(path))

    def failed(self, message: str) -> None:
        self._update(phase="failed", phase_started=time.time(), message=message)

    def stopped(self, signal_name: str, message: str = "") -> None:
        """The run was stopped by `signal_name` (SIGINT, SIGTERM, ...); completed checkpoints are intact."""
        self._update(phase="stopped", phase_started=time.time(), signal=signal_name,
                     message=f"{signal_name}: {message}" if message else signal_name)

    def done(self) -> None:
        self._update(phase="done", phase_started=time.time(), message="")

    def snapshot(self) -> dict[str, Any]:
        """A copy of the current state (what the file says, or would say after the next write)."""
        with self._lock:
            return dict(self._state)

    # -- writing -------------------------------------------------------------------------------
    def _update(self, _throttle: bool = False, **changes: Any) -> None:
        with self._lock:
            self._state.update(changes)
            now = time.time()
            self._state["time"] = now
            if _throttle and self._min_interval > 0 and now - self._last_write < self._min_interval:
                return
            self._last_write = now
            self._write_locked()

    def _write_locked(self) -> None:
        # Same directory as the target so os.replace is an atomic rename; pid in the name so two
        # processes sharing an output dir (DDP misconfiguration) never write into each other's temp.
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            data = memoryview(json.dumps(self._state, sort_keys=True).encode("utf-8"))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # no buffered-file layer: ~2x cheaper
            try:
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except (OSError, TypeError, ValueError) as e:
            if not self._warned:  # once: a full disk would otherwise flood the log every step
                self._warned = True
                logger.warning("could not write heartbeat file %s: %s (training continues)", self.path, e)


def file_name_for_rank(rank: int) -> str:
    return FILE_NAME if int(rank) == 0 else RANK_FILE_NAME.format(rank=int(rank))


def read_heartbeat(output_dir: str | os.PathLike, rank: int = 0) -> dict[str, Any] | None:
    """The last heartbeat rank `rank` wrote in `output_dir`, or None when missing or unreadable."""
    return read_json_object(Path(output_dir) / file_name_for_rank(rank))
