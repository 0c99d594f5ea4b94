"""The one output drain: the trainer's merged stdout/stderr -> train.log, the progress parser, the console.

- `OutputDrain`: a reader thread that never stalls the trainer (a full pipe would freeze it): the log file
  and the parser are fed on the reader thread; the console gets chunks through a bounded queue that drops
  when the console lags (the log has everything).
- `LogTail`: the same feed for attach mode, from a train.log someone else writes.
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
        # Anything that is not a byte stream takes text: sys.stdout may be a wrapper that is no TextIOBase
        # (fluxgym.closed_pipe's guard under `python -m fluxgym`), and bytes written to it kill the echo thread.
        self.text = not isinstance(echo, (io.RawIOBase, io.BufferedIOBase)) and "b" not in getattr(echo, "mode", "")
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
        except (OSError, ValueError):
            return False  # a closed console must not stop anything


class OutputDrain:
    """Reader thread for a pipe: file + parser always, console echo best effort (drops when it lags)."""

    def __init__(self, pipe: BinaryIO, log_path: Path, feed: Callable[[bytes], None], echo=None):
        self.tail = TextTail()
        self.dropped = 0
        self._pipe, self._feed = pipe, feed
        self._console = _Console(echo) if echo is not None else None
        self._log: BinaryIO | None = open(log_path, "ab")
        self._queue: queue.Queue = queue.Queue(maxsize=512)
        self._reader = threading.Thread(target=self._read, name="fluxgym-drain", daemon=True)
        self._reader.start()
        if self._console is not None:
            threading.Thread(target=self._write_console, name="fluxgym-echo", daemon=True).start()

    def _read(self) -> None:
        fd = self._pipe.fileno()
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                self._write_log(chunk)
                self.tail.add(chunk)
                try:
                    self._feed(chunk)
                except Exception:  # a parser bug must never stop the draining
                    log.exception("progress parser failed on a chunk of output")
                if self._console is not None:
                    try:
                        self._queue.put_nowait(chunk)
                    except queue.Full:
                        self.dropped += len(chunk)  # the console lags; the file has everything
        except OSError as exc:
            log.warning("reading the training output stopped: %s", exc)
        finally:
            if self._log is not None:
                try:
                    self._log.close()
                except OSError:
                    pass
            if self._console is not None:
                try:
                    self._queue.put_nowait(None)  # ends the console thread; if it lags, it is a daemon anyway
                except queue.Full:
                    pass

    def _write_log(self, chunk: bytes) -> None:
        if self._log is None:
            return
        try:
            self._log.write(chunk)
            self._log.flush()  # the log on disk is what `status`, attach mode and a crashed UI rely on
        except OSError as exc:  # disk full: keep draining (a full pipe would freeze the trainer), stop logging
            log.error("cannot write train.log any more (%s); the trainer's output is no longer saved", exc)
            self._log = None

    def _write_console(self) -> None:
        while True:
            chunk = self._queue.get()
            if not self._console.write(chunk) or chunk is None:
                return

    def join(self, timeout: float) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()


class LogTail:
    """Attach mode: feed the bytes appended to an existing train.log since the last poll."""

    def __init__(self, path: Path, feed: Callable[[bytes], None]):
        self.path, self._feed, self.tail = path, feed, TextTail()
        try:
            self._pos = path.stat().st_size
        except OSError:
            self._pos = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                chunk = fh.read(8 << 20)
        except OSError:
            return
        if chunk:
            self._pos += len(chunk)
            self.tail.add(chunk)
            self._feed(chunk)
