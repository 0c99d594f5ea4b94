"""The one progress tracker: is the run moving, which phase is it in, and when is it stuck?

- `LogParser`: upstream's console markers (sd-scripts/library/console_markers.py: tqdm `steps:` bar with its
  `avr_loss=` postfix, `epoch k/E`, saving/caching/sampling lines), split on `\\r` as well as `\\n`.
- `ProgressTracker`: merges the heartbeats of every rank (most trusted), the markers and file activity in
  the output folder into one "last progress" time, applies the phase deadlines, the first-step deadline,
  and the slow-crawl warning. GPU utilisation is deliberately not an input.
Stdlib + psutil only.
"""

from __future__ import annotations

import codecs
import os
import re
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from fluxgym._paths import use_sd_scripts

use_sd_scripts()
from library.console_markers import HINTS as _HINTS, MARKERS as _MARKERS, OPEN_BAR as _OPEN_BAR  # noqa: E402
from library.heartbeat import read_heartbeat  # noqa: E402

# Files the supervisor itself or the heartbeat writers touch all the time: never "progress".
_OWN_FILES = re.compile(r"^(train\.log|train\.pid|events\.jsonl|training_monitor\.log|\.stop-requested|"
                        r"heartbeat(-rank\d+)?\.json|\.heartbeat(-rank\d+)?\.json\.tmp-.*|stall-.*\.txt|"
                        r"last_run\.json|\.train\.pid\.tmp-.*)$")
_RANK_FILE = re.compile(r"^heartbeat-rank(\d+)\.json$")
_LOSS = re.compile(r"\b(?:avr_loss|loss)=\s*(?P<loss>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_CARRY_MAX = 4096
PHASES_CACHING = ("caching_latents", "caching_text", "caching")
TERMINAL = ("done", "failed", "stopped")  # "stopped": ended by SIGTERM/SIGINT, never a stall


@dataclass
class Deadlines:
    """Seconds without progress after which each phase counts as stuck."""

    loading: float = 1800.0
    caching: float = 1800.0
    saving: float = 900.0
    sampling: float = 900.0
    stuck_threshold: float = 300.0  # floor of the training-step deadline
    first_step: float = 600.0  # until the first step of a launch completes (compile, warm-up)
    step_factor: float = 5.0  # step deadline = max(stuck_threshold, step_factor x p99 step time)
    crawl_factor: float = 10.0
    crawl_steps: int = 3
    min_samples: int = 3

    def for_phase(self, phase: str, step_times: list[float], warm: bool = True) -> float:
        if phase in PHASES_CACHING:
            return self.caching
        if phase in ("saving", "done"):
            return self.saving
        if phase == "sampling":
            return self.sampling
        if phase == "training":
            if not warm:
                return max(self.stuck_threshold, self.first_step)
            if len(step_times) < self.min_samples:
                return self.stuck_threshold
            ordered = sorted(step_times)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1) + 0.5))]
            return max(self.stuck_threshold, self.step_factor * p99)
        if phase == "failed":  # our trainer's own guard fired and is exiting; give it a short grace
            return self.stuck_threshold
        return self.loading


@dataclass
class LogState:
    phase: str = "loading"
    step: int | None = None
    total: int | None = None
    epoch: int | None = None
    total_epochs: int | None = None
    loss: float | None = None
    changes: int = 0  # bumps on every marker that means "something moved"


class LogParser:
    """Feed raw byte chunks; keeps the upstream-visible state. Not thread-safe (the tracker locks)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.state = LogState()
        self._clock = clock
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carry = ""
        self._other_bar: tuple[str, int, int] | None = None
        # (new step, seconds per step since the previous one or None) since the last take. Timed from the
        # moment each bar line arrives, so several steps between two polls are still timed one by one.
        self.step_events: list[tuple[int, float | None]] = []
        self._last_step_at: float | None = None  # None after a non-training marker: that gap is no step time

    def feed(self, chunk: bytes) -> None:
        text = self._carry + self._decoder.decode(chunk)
        cut = max(text.rfind("\n"), text.rfind("\r"))  # -1: no line end yet, all of it is carried
        self._carry = text[cut + 1:][-_CARRY_MAX:]
        body = text[: cut + 1]
        if any(h in body for h in _HINTS):
            for m in _MARKERS.finditer(body.replace("\r", "\n")):
                self._apply(m)
        if "%|" in self._carry:
            m = _OPEN_BAR.search(self._carry)
            if m:
                self._apply(m)  # read again when its line ends: same counter, so counted once

    def _apply(self, m: re.Match) -> None:
        st = self.state
        if m.group("bar"):
            n, total = int(m.group("n")), int(m.group("m"))
            desc = (m.group("desc") or "").strip()
            if desc.endswith("steps"):
                loss = _LOSS.search(m.string, m.end(), m.string.find("\n", m.end()) % (len(m.string) + 1))
                if loss:
                    st.loss = float(loss["loss"])
                if st.step is None or n != st.step:
                    now = self._clock()
                    if st.step is None or n > st.step:
                        timed = st.step is not None and self._last_step_at is not None
                        self.step_events.append((n, (now - self._last_step_at) / (n - st.step) if timed else None))
                    self._last_step_at = now
                    st.step, st.total, st.phase = n, total, "training"
                    st.changes += 1
            elif (desc, n, total) != self._other_bar:  # caching/sampling bars: alive when their count moves
                self._other_bar = (desc, n, total)
                st.changes += 1
            return
        if m.group("ep"):
            st.epoch, st.total_epochs, st.phase = int(m.group("ep")), int(m.group("eps")), "training"
            st.changes += 1
            return
        for name in ("saving", "caching_latents", "caching_text", "sampling", "done", "failed"):
            if m.group(name):
                st.phase = name
                st.changes += 1
                self._last_step_at = None
                return


def file_signature(output_dir: Path, limit: int = 5000) -> tuple[int, int, int]:
    """(count, total size, newest mtime) of the output folder and its direct subfolders (state dirs, sample/)."""
    count = size = newest = 0
    try:
        top = list(os.scandir(output_dir))
    except OSError:
        return (0, 0, 0)
    stack = [(e, True) for e in top]
    while stack and count < limit:
        entry, descend = stack.pop()
        if _OWN_FILES.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False):
                if descend:
                    stack.extend((e, False) for e in os.scandir(entry.path))
                continue
        except OSError:
            continue
        count += 1
        size += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return (count, size, newest)


def rank_heartbeats(output_dir: Path) -> dict[int, dict]:
    """Every rank's heartbeat in `output_dir`: {rank: heartbeat}; rank 0 is heartbeat.json."""
    beats: dict[int, dict] = {}
    hb = read_heartbeat(output_dir)
    if hb is not None:
        beats[0] = hb
    try:
        names = [e.name for e in os.scandir(output_dir) if _RANK_FILE.match(e.name)]
    except OSError:
        names = []
    for name in names:
        rank = int(_RANK_FILE.match(name).group(1))
        hb = read_heartbeat(output_dir, rank)
        if hb is not None:
            beats[rank] = hb
    return beats


@dataclass
class Stall:
    phase: str
    step: int | None
    idle_s: float
    deadline_s: float
    source: str  # "heartbeat" or "log"
    rank: int | None = None  # the rank that stopped moving, when the ranks disagree

    def describe(self) -> str:
        who = f"rank {self.rank}: " if self.rank is not None else ""
        return (f"{who}no progress for {self.idle_s:.0f} s in phase '{self.phase}' (step {self.step}); "
                f"the deadline for this phase is {self.deadline_s:.0f} s")


@dataclass
class _Rank:
    key: tuple
    changed: float
    hb: dict


@dataclass
class ProgressTracker:
    """One per launch. `feed` may be called from the output thread; everything else from the main loop."""

    output_dir: Path
    deadlines: Deadlines
    clock: Callable[[], float] = time.monotonic
    started_wall: float = field(default_factory=time.time)
    resume_step: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.parser = LogParser(self.clock)
        self.last_progress = self.clock()
        self._log_changes = 0
        self._files = file_signature(self.output_dir)
        self.step_times: deque[float] = deque(maxlen=500)
        self._last_step: tuple[int, float] | None = None  # heartbeat timing: (step, clock) of the last step
        self._log_timing = False  # once the console shows a steps bar, it times the steps (finer than polls)
        self._first: dict[str, int] = {}  # per source ("log", "hb"): first and highest step of this launch
        self._max: dict[str, int] = {}
        self._slow_run = 0
        self._crawl_reported = False
        self.ranks: dict[int, _Rank] = {}
        self.heartbeat: dict | None = None  # the lowest rank's (heartbeat.json where this machine has rank 0)
        self._last_phase = "loading"
        self.warm = False  # set when attaching to a run already past its first step

    def adopt_heartbeat(self) -> None:
        """Attach mode: count idle time from the heartbeats' own timestamps, not from when we attached."""
        for rank, hb in sorted(rank_heartbeats(self.output_dir).items()):
            if not isinstance(hb.get("time"), (int, float)):
                continue
            if rank and not (isinstance(hb.get("pid"), int) and psutil.pid_exists(hb["pid"])):
                continue  # a rank file left by an earlier run with more processes: nobody beats into it now
            changed = self.clock() - max(0.0, time.time() - hb["time"])
            self.ranks[rank] = _Rank(self._key(hb), changed, hb)
        if self.ranks:
            self.heartbeat = self.ranks[min(self.ranks)].hb
            self._last_phase = self.phase
            self.warm = isinstance(self.heartbeat.get("step"), int) and self.heartbeat["step"] > 0
            self.last_progress = max(r.changed for r in self.ranks.values())

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            self.parser.feed(chunk)

    # -- what the run says ---------------------------------------------------------------------
    @staticmethod
    def _key(hb: dict) -> tuple:
        return (hb.get("phase"), hb.get("step"), hb.get("time"), hb.get("epoch"))

    def _fresh(self, hb: dict) -> bool:
        # A heartbeat from an earlier run (or attempt) is older than this launch: ignore it.
        return isinstance(hb.get("time"), (int, float)) and hb["time"] >= self.started_wall - 2.0

    @property
    def phase(self) -> str:
        if self.heartbeat is not None and isinstance(self.heartbeat.get("phase"), str):
            return self.heartbeat["phase"]
        return self.parser.state.phase

    @property
    def step(self) -> int | None:
        if self.heartbeat is not None and isinstance(self.heartbeat.get("step"), int):
            return self.heartbeat["step"]
        return self.parser.state.step

    @property
    def loss(self) -> float | None:
        if self.heartbeat is not None and isinstance(self.heartbeat.get("loss"), (int, float)):
            return float(self.heartbeat["loss"])
        return self.parser.state.loss

    @property
    def total_steps(self) -> int | None:
        return (self.heartbeat or {}).get("total_steps") or self.parser.state.total

    @property
    def epoch(self) -> int | None:
        return (self.heartbeat or {}).get("epoch", self.parser.state.epoch)

    def advanced(self) -> bool:
        """Did this launch get past the step it resumed from (or, for relative log counters, move at all)?"""
        if self.heartbeat is not None and "hb" in self._max:
            return self._max["hb"] > self.resume_step  # our trainer counts absolute steps
        return "log" in self._max and self._max["log"] > self._first["log"]

    def _stepped(self) -> bool:
        return any(self._max[k] > self._first[k] for k in self._max)

    # -- polling -------------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Read all signals once; returns warning events (slow crawl)."""
        now = self.clock()
        events: list[dict] = []
        with self._lock:
            log_changes = self.parser.state.changes
            step_events, self.parser.step_events = self.parser.step_events, []
        hb_step = self._poll_heartbeats(now)
        if log_changes != self._log_changes:
            self._log_changes = log_changes
            self.last_progress = now
        phase = self.phase
        if phase != self._last_phase:
            self._last_phase = phase
            self.last_progress = now
            self._last_step = None  # time spent saving/sampling is not step time
        if phase != "training":
            sig = file_signature(self.output_dir)
            if sig != self._files:
                self._files = sig
                self.last_progress = now
        for step, per_step in step_events:
            self._log_timing = True
            if self._note_step("log", step) and per_step is not None:
                events.extend(self._add_step_time(per_step, step, 1))
        if hb_step is not None and self._note_step("hb", hb_step[0]) and not self._log_timing:
            events.extend(self._time_heartbeat_step(*hb_step, phase))
        return events

    def _poll_heartbeats(self, now: float) -> tuple[int, float] | None:
        """Update every rank's last change; returns (step, clock of its write) for the lead heartbeat."""
        lead_step = None
        for rank, hb in rank_heartbeats(self.output_dir).items():
            if not self._fresh(hb):
                continue
            key = self._key(hb)
            seen = self.ranks.get(rank)
            if seen is not None and seen.key == key:
                continue
            self.ranks[rank] = _Rank(key, now, hb)
            self.last_progress = now
        if self.ranks:
            lead = min(self.ranks)
            hb = self.ranks[lead].hb
            if hb is not self.heartbeat:
                self.heartbeat = hb
                if isinstance(hb.get("step"), int) and self.ranks[lead].changed == now:
                    lead_step = (hb["step"], now - max(0.0, time.time() - float(hb["time"])))  # its own time
        return lead_step

    def _note_step(self, source: str, step: int) -> bool:
        """Track first/highest step per source; True when `step` is new for that source."""
        self._first.setdefault(source, step)
        if source in self._max and step <= self._max[source]:
            return False
        self._max[source] = step
        return True

    def _time_heartbeat_step(self, step: int, at: float, phase: str) -> list[dict]:
        """Without a console bar: step times from heartbeat timestamps (coarser: steps between polls merge)."""
        last, self._last_step = self._last_step, (step, at)
        if phase != "training" or last is None:
            return []
        n = max(1, step - last[0])
        return self._add_step_time((at - last[1]) / n, step, n)

    def _add_step_time(self, per_step: float, step: int, n: int) -> list[dict]:
        events = self._crawl_check(per_step, step, n)
        # One entry per step (capped), so that a poll seeing many fast steps weighs as much as they did.
        self.step_times.extend([max(0.0, per_step)] * min(n, 20))
        return events

    def _crawl_check(self, per_step: float, step: int, n: int) -> list[dict]:
        if len(self.step_times) < 5:
            return []
        med = statistics.median(self.step_times)
        if med > 0 and per_step > self.deadlines.crawl_factor * med:
            self._slow_run += n
        else:
            self._slow_run = 0
            self._crawl_reported = False
        if self._slow_run >= self.deadlines.crawl_steps and not self._crawl_reported:
            self._crawl_reported = True
            return [{
                "event": "crawl", "step": step, "step_time_s": round(per_step, 3), "median_s": round(med, 3),
                "message": (
                    f"training is crawling: the last {self._slow_run} steps took {per_step:.1f} s each, over "
                    f"{self.deadlines.crawl_factor:g}x the median {med:.2f} s (system-memory fallback or swapping?); "
                    "not stopping it"),
            }]
        return []

    def check(self) -> Stall | None:
        """A stall when nothing moved for longer than the deadline, or when one rank stopped moving for
        that long while another still moves. The deadline is the most generous of the ranks' phases
        (a rank waiting at a barrier while rank 0 saves is not stuck). Never for a stopped run."""
        phase = self.phase
        live = {r: s for r, s in self.ranks.items() if s.hb.get("phase") not in TERMINAL}
        if phase == "stopped" or (self.ranks and all(s.hb.get("phase") == "stopped" for s in self.ranks.values())):
            return None
        warm = self.warm or self._stepped()
        times = list(self.step_times)
        phases = {phase} | {s.hb.get("phase") for s in live.values() if isinstance(s.hb.get("phase"), str)}
        deadline = max(self.deadlines.for_phase(p, times, warm) for p in phases)
        now = self.clock()
        idle = now - self.last_progress
        source = "heartbeat" if self.heartbeat else "log"
        if idle > deadline:
            return Stall(phase, self.step, idle, deadline, source)
        if len(live) > 1:
            rank, oldest = min(live.items(), key=lambda kv: kv[1].changed)
            if now - oldest.changed > deadline:
                return Stall(oldest.hb.get("phase") or phase, oldest.hb.get("step"), now - oldest.changed,
                             deadline, "heartbeat", rank=rank)
        return None

    def rank_lines(self) -> list[str]:
        """One line per rank for the stall report: phase, step, seconds since it last moved, pid."""
        now = self.clock()
        return [f"rank {r}: phase {s.hb.get('phase')} step {s.hb.get('step')} pid {s.hb.get('pid')} "
                f"last moved {now - s.changed:.0f} s ago" for r, s in sorted(self.ranks.items())]
