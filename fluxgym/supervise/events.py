"""Run events as JSON lines (outputs/<slug>/events.jsonl): what UIs and `fluxgym status` read.

- `EventLog.emit(kind, **fields)`: adds the common keys (`time`, `event`, `job`, `run`), appends one line
  (a single write of a whole line, flushed, so readers never see half of one unless the disk filled up)
  and passes the event to the caller's callback.
- `read_events(path, since)`: the events after byte offset `since` and the new offset; a torn last line is
  left for the next call.
A full or read-only disk never stops the supervision: the first failure is logged and reported once.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

EVENT_KINDS = ("started", "phase", "step", "checkpoint", "sample", "stall", "restart", "oom_retry", "done",
               "failed", "stopped")


class EventLog:
    def __init__(self, path: Path | None, *, job_id: int | None = None,
                 on_event: Callable[[dict], None] | None = None):
        self.path, self.job_id, self.on_event = path, job_id, on_event
        self.run_id = uuid.uuid4().hex
        self.write_error: str | None = None

    def new_run(self) -> None:
        self.run_id = uuid.uuid4().hex

    def emit(self, kind: str, **fields) -> dict:
        event = {"time": time.time(), "event": kind, "job": self.job_id, "run": self.run_id, **fields}
        self._append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a UI callback bug must never stop the supervision of a training run
                log.exception("event callback failed on %s", kind)
        return event

    def _append(self, event: dict) -> None:
        if self.path is None or self.write_error is not None:
            return
        line = (json.dumps(event, default=str) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)  # O_APPEND: one write, one whole line at the end
            finally:
                os.close(fd)
        except OSError as exc:
            self.write_error = f"cannot write {self.path}: {exc}"
            log.error("%s; events are no longer recorded (training goes on, train.log still has the output)",
                      self.write_error)


def read_events(path: Path, since: int = 0) -> tuple[list[dict], int]:
    """Events after byte offset `since`, and the offset to pass next time (a torn last line waits)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(since)
            data = fh.read()
    except OSError:
        return [], since
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue  # a line torn by a crash in the middle of the file: skip it, keep the rest
        if isinstance(event, dict):
            events.append(event)
    return events, since + end


def tail_events(path: Path, max_bytes: int = 512 * 1024) -> list[dict]:
    """The events in the last `max_bytes` of the file (a long run writes many step events)."""
    try:
        size = path.stat().st_size
    except OSError:
        return []
    start = max(0, size - max_bytes)
    if start:
        with open(path, "rb") as fh:  # begin after the first line end: the line cut by `start` is partial
            fh.seek(start)
            start += len(fh.readline())
    return read_events(path, start)[0]
