"""Let a command's reader go away (`python -m fluxgym status x | head -1`) without a BrokenPipeError traceback.

Python ignores SIGPIPE, so a write to a pipe whose reader has exited raises BrokenPipeError: at a print, or at
the flush when the interpreter exits ("Exception ignored ... BrokenPipeError", exit code 120). Inside
`quiet_closed_pipe()` stdout is the trainer's own `TolerantStream` (library.console_streams, one definition of
"a console that fails is dropped, not raised"): the first such error points stdout at os.devnull and the
command carries on to its usual exit code. Output nobody reads is dropped; the work itself (a status read, a
supervised training) is not cut short. Stdlib only: tools/find_checkpoint.py uses it too.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, TextIO

from fluxgym._paths import use_sd_scripts


@contextlib.contextmanager
def quiet_closed_pipe() -> Iterator[TextIO]:
    """Wrap a CLI entry point: a closed stdout pipe ends its output quietly, not the command."""
    use_sd_scripts()
    from library.console_streams import TolerantStream

    real = sys.stdout
    guard = TolerantStream(real)
    sys.stdout = guard
    try:
        yield guard
    finally:
        guard.flush()  # flush while a closed pipe is still caught here, not at interpreter exit
        sys.stdout = real
