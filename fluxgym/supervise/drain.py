"""The one output drain: follow the trainer's train.log for the progress parser, the console and the error tail.

The trainer writes its merged stdout/stderr straight into train.log (`open_log` gives the launch an
O_APPEND file, never a pipe), so its output does not depend on the supervisor staying alive: a killed
worker, UI or `fluxgym train` leaves a run that keeps training and can be adopted later.
- `LogFollower`: a thread that reads what is appended to train.log from a byte offset (the end of the
  launch header, or the end of the file when adopting a run) and feeds the parser, the tail and the console.
  The console gets chunks through a bounded queue that drops when the console lags (the file has everything).
- `TextTail`: the last ~256 KB as a terminal would show it (last `\\r` segment of each line).
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)

_TAIL_BYTES = 256 * 1024
_READ_BYTES = 1 << 20
FOLLOW_INTERVAL = 0.1  # seconds between looks at train.log: the parser times steps from when it sees them


class TextTail:
    """The last ~256 KB of output, turned into what a terminal would show."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def add(self, chunk: bytes) -> None:
        with self._lock:
            self._chunks.append(chunk)
            self._size += len(chunk)
            while self._size > _TAIL_BYTES and len(self._chunks) > 1:
                self._size -= len(self._chunks.popleft())

    def lines(self, n: int = 200) -> list[str]:
        with self._lock:
            text = b"".join(self._chunks).decode("utf-8", "replace")
        shown = [ln.rstrip("\r").split("\r")[-1] for ln in text.split("\n")]
        return [ln for ln in shown if ln.strip()][-n:]


class _Console:
    """Writes bytes to a binary stream, or decoded text to a text stream (sys.stdout), best effort."""

    def __init__(self, echo) -> None:
        self.echo = echo
        # sys.stdout may be a stand-in (fluxgym.closed_pipe) that is no TextIOBase: text streams have an encoding
        self.text = isinstance(echo, io.TextIOBase) or hasattr(echo, "encoding")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, chunk: bytes | None) -> bool:
        try:
            if chunk is None:
                if self.text:
                    self.echo.write(self._decoder.decode(b"", final=True))
            else:
                self.echo.write(self._decoder.decode(chunk) if self.text else chunk)
            self.echo.flush()
            return True
        except (OSError, ValueError, TypeError):
            return False  # a closed console must not stop anything


def open_log(path: Path, header: str) -> tuple[BinaryIO, int]:
    """train.log opened for appending (the launch's stdout+stderr), the header written; returns the file
    and the offset where the launch's own output will begin. OSError when the file cannot be opened; a
    header that cannot be written (disk full) is only logged: the trainer may still get space later."""
    fh = open(path, "ab", buffering=0)  # O_APPEND: the trainer and every rank append whole writes at the end
    try:
        fh.write(header.encode("utf-8", "replace"))
    except OSError as exc:
        log.error("cannot write %s: %s (training starts anyway; its output may be lost)", path, exc)
    return fh, os.fstat(fh.fileno()).st_size


class LogFollower:
    """Follows `path` from byte offset `start` (None: its current end) on a thread of its own: every new
    chunk goes to the tail, to `feed` (the progress parser) and to the console echo. `finish()` reads up to
    the end of the file one last time and stops. The trainer never waits on any of it."""

    def __init__(self, path: Path, feed: Callable[[bytes], None], echo=None, *, start: int | None = None,
                 interval: float = FOLLOW_INTERVAL):
        self.path, self._feed, self.interval = path, feed, interval
        self.tail = TextTail()
        self.dropped = 0
        if start is None:
            try:
                start = path.stat().st_size
            except OSError:
                start = 0  # not written yet: all of it will be new
        self._pos = start
        self._fh: BinaryIO | None = None
        self._stop = threading.Event()
        self._console = _Console(echo) if echo is not None else None
        self._queue: queue.Queue = queue.Queue(maxsize=512)
        if self._console is not None:
            threading.Thread(target=self._write_console, name="fluxgym-echo", daemon=True).start()
        self._reader = threading.Thread(target=self._follow, name="fluxgym-drain", daemon=True)
        self._reader.start()

    def _open(self) -> bool:
        try:
            self._fh = open(self.path, "rb")
        except OSError:
            return False  # not there yet (an adopted run that has not written anything): look again later
        self._fh.seek(self._pos)
        return True

    def _read_all(self) -> None:
        """Everything appended since the last read."""
        if self._fh is None and not self._open():
            return
        while True:
            try:
                chunk = self._fh.read(_READ_BYTES)
                if not chunk:
                    if os.fstat(self._fh.fileno()).st_size < self._pos:  # truncated by hand: start over
                        log.warning("%s was truncated; following it from its start", self.path)
                        self._fh.seek(0)
                        self._pos = 0
                        continue
                    return
            except OSError as exc:
                log.warning("reading %s failed: %s", self.path, exc)
                return
            self._pos += len(chunk)
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        self.tail.add(chunk)
        try:
            self._feed(chunk)
        except Exception:  # a parser bug must never stop the following
            log.exception("progress parser failed on a chunk of output")
        if self._console is not None:
            try:
                self._queue.put_nowait(chunk)
            except queue.Full:
                self.dropped += len(chunk)  # the console lags; the file has everything

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                self._read_all()
                self._stop.wait(self.interval)
            self._read_all()  # what was written up to the moment finish() was called
        finally:
            if self._fh is not None:
                self._fh.close()
            if self._console is not None:
                try:
                    self._queue.put_nowait(None)  # ends the console thread; if it lags, it is a daemon anyway
                except queue.Full:
                    pass

    def _write_console(self) -> None:
        while True:
            chunk = self._queue.get()
            if not self._console.write(chunk) or chunk is None:
                return

    def finish(self, timeout: float = 5.0) -> bool:
        """Read to the end of the file once more, then stop. True when the reader is done."""
        self._stop.set()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout)
        return not self._reader.is_alive()
