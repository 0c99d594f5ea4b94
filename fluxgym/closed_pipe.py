"""Let a command's reader go away (`python -m fluxgym status x | head -1`) without a BrokenPipeError traceback.

Python ignores SIGPIPE, so a write to a pipe whose reader has exited raises BrokenPipeError: at a print, or at
the flush when the interpreter exits ("Exception ignored ... BrokenPipeError", exit code 120). Inside
`quiet_closed_pipe()` the first such error points stdout at os.devnull and the command carries on to its usual
exit code: output nobody reads is dropped, the work itself (a status read, a supervised training) is not cut short.
Stdlib only: tools/find_checkpoint.py uses it too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, TextIO


def _point_at_devnull(stream: TextIO) -> None:
    """Later writes and the interpreter's final flush then succeed, into nothing."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture buffer): nothing is left to flush into the pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _StdoutGuard:
    """Stands in for sys.stdout; everything but write/flush goes to the real stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def _gone(self) -> None:
        self.reader_gone = True
        _point_at_devnull(self._stream)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()  # what was still buffered now goes to os.devnull

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_closed_pipe() -> Iterator[_StdoutGuard]:
    """Wrap a CLI entry point: a closed stdout pipe ends its output quietly, not the command."""
    real = sys.stdout
    guard = _StdoutGuard(real)
    sys.stdout = guard
    try:
        yield guard
    finally:
        guard.flush()  # flush while a closed pipe is still caught here, not at interpreter exit
        sys.stdout = real
