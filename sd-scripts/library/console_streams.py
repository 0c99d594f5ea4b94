"""A console that fails never ends a training run: write errors on stdout/stderr are dropped, not raised.

The trainer's console is whatever it was started with: a terminal, a pipe into `tee`, or train.log itself
(under the fluxgym supervisor). A terminal that closed (EIO), a pipe whose reader exited (EPIPE) or a full
disk under the log (ENOSPC) would otherwise raise OSError from the next print or progress-bar update and
end hours of training mid-step. Checkpoints and heartbeats are separate files that report their own
failures. Stdlib only.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import TextIO

# The reader is gone for good: later output goes to os.devnull (so the interpreter's last flush succeeds too).
# Anything else (ENOSPC, EDQUOT, EFBIG) may pass: keep trying, so the log resumes once there is space again.
_GONE = {errno.EPIPE, errno.EIO, errno.EBADF}


class TolerantStream:
    """Stands in for sys.stdout/sys.stderr; everything but write/flush goes to the real stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.failures = 0

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        if exc.errno in _GONE:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, self._stream.fileno())
                finally:
                    os.close(devnull)
            except (AttributeError, OSError, ValueError):
                pass  # not a real file descriptor: nothing is left to flush into it

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._failed(exc)
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._failed(exc)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def tolerate_console_errors() -> None:
    """Wrap sys.stdout and sys.stderr (once); call before logging and progress bars take their streams."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, TolerantStream):
            setattr(sys, name, TolerantStream(stream))
