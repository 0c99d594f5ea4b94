"""A console that fails (full disk under train.log, a pipe whose reader exited) never ends the trainer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SD_SCRIPTS = Path(__file__).resolve().parents[2] / "sd-scripts"
# Prints like the trainer does (print, a progress bar's \r updates on stderr, logging), then does its "work".
SCRIPT = r"""
import logging, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[3] == "tolerant":
    from library.console_streams import tolerate_console_errors
    tolerate_console_errors()
logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler()])
for i in range(300):
    print(f"epoch 1/1 step {i}", flush=True)
    sys.stderr.write(f"\rsteps: {i}/300")
    logging.getLogger("t").info("saving checkpoint %d", i)
open(sys.argv[2], "w").write("the work after the console failed")
"""


def _run(tmp_path: Path, stdout, tolerant: bool) -> tuple[int, bool]:
    done = tmp_path / f"done-{tolerant}"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(SD_SCRIPTS), str(done),
                           "tolerant" if tolerant else "plain"], stdout=stdout, stderr=subprocess.STDOUT,
                          timeout=60)
    return proc.returncode, done.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_a_full_disk_under_the_console_does_not_end_the_run(tmp_path):
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC, as train.log on a full disk
        assert _run(tmp_path, full, tolerant=False) == (1, False)  # what the wrapper prevents
        assert _run(tmp_path, full, tolerant=True) == (0, True)


def test_a_console_pipe_whose_reader_exited_does_not_end_the_run(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `trainer | tee log` with tee gone, or a supervisor that was killed
    try:
        rc, done = _run(tmp_path, write_end, tolerant=False)
        assert rc != 0 and not done
        assert _run(tmp_path, write_end, tolerant=True) == (0, True)
    finally:
        os.close(write_end)
