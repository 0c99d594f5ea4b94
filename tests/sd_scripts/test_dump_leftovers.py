"""Hidden stack-dump files (`.stall-dump-PID.txt`, `.stacks-dump-PID.txt`) of a process that was killed are
tidied when the next run starts its hang guards: empty ones removed, a written dump published; a live
process's files are left alone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from library.hang_guards import HangGuards

pytestmark = pytest.mark.skipif(os.name == "nt", reason="liveness by pid is not checked on Windows")


def test_dead_processes_hidden_dump_files_are_tidied_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = str(os.getppid())  # the process that started pytest is running
    (tmp_path / f".stall-dump-{dead}.txt").write_text("")
    (tmp_path / f".stacks-dump-{dead}.txt").write_text("")
    (tmp_path / f".stall-dump-{int(dead) + 1000000}.txt").write_text("Thread 0x1 (most recent call first):\n")
    (tmp_path / f".stall-dump-{live}.txt").write_text("")
    (tmp_path / ".stacks-dump-notapid.txt").write_text("")
    guards = HangGuards(tmp_path, None, stall_dump_timeout=0)
    try:
        names = sorted(p.name for p in tmp_path.iterdir())
    finally:
        guards.close()
    assert f".stall-dump-{dead}.txt" not in names and f".stacks-dump-{dead}.txt" not in names
    assert f".stall-dump-{live}.txt" in names and ".stacks-dump-notapid.txt" in names
    published = [n for n in names if n.startswith("hang-")]
    assert len(published) == 1 and "Thread 0x1" in (tmp_path / published[0]).read_text()
