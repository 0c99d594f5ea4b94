"""Write a file under a temporary name next to it, then rename it into place (one step on every OS).

A reader (the trainer, a UI, `generate`) therefore sees the old file or the new one, never half of one. No fsync:
these are dataset copies and generated scripts that can be made again, not checkpoints.
`stale_temp_files` finds the temporary names a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import psutil

_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<pid>\d+)$")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path in `final`'s folder; on success it replaces `final`, on any error it is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: Path, text: str, *, newline: str | None = "\n", mode: int | None = None) -> None:
    """UTF-8 text; `newline=""` writes the text's own line endings unchanged."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files of `atomic_path` in `folder` whose process is gone (killed mid-write)."""
    stale = []
    for path in sorted(Path(folder).iterdir()):
        m = _TEMP_RE.match(path.name)
        if m and path.is_file() and not psutil.pid_exists(int(m["pid"])):
            stale.append(path)
    return stale
