"""One trainer per output folder: the lock file, its holder record, a dead holder that never blocks, and the
real entry script refusing a folder another process holds (exit 4, before any model loads)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from library import errors
from library.output_lock import LOCK_NAME, acquire_output_lock, read_lock_holder
from train_helpers import REPO, SCRIPT, make_dataset, trainer_args

SD = str(REPO / "sd-scripts")
HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {sd!r})
    from library.output_lock import acquire_output_lock
    lock = acquire_output_lock(__import__("pathlib").Path(sys.argv[1]), command=["holder-cmd", "--flag", "x y"])
    print("locked", flush=True)
    time.sleep(120)
    """
)


def start_holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(sd=SD), str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_records_holder_and_release_frees_it(tmp_path):
    out = tmp_path / "out" / "nested"  # created by the lock
    assert read_lock_holder(out) is None
    with acquire_output_lock(out, command=["python", "train.py"]) as lock:
        assert lock.held
        holder = read_lock_holder(out)
        assert holder["pid"] == os.getpid() and holder["command"] == ["python", "train.py"]
        assert holder["host"] and holder["acquired"] <= time.time()
        if sys.platform.startswith("linux"):
            assert abs(holder["process_start"] - time.time()) < 24 * 3600
    assert read_lock_holder(out) is None
    assert (out / LOCK_NAME).read_text() == ""  # a released lock names nobody
    acquire_output_lock(out, command=["again"]).release()  # and can be taken again at once


def test_second_process_is_refused_naming_pid_and_command(tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.FolderInUseError) as info:
            acquire_output_lock(out, command=["second"])
        assert time.monotonic() - t0 < 5
        msg = str(info.value)
        assert f"pid {holder.pid}" in msg and "holder-cmd --flag 'x y'" in msg and str(out) in msg
        assert f"kill {holder.pid}" in msg and "--output_dir" in msg
        assert info.value.exit_code == errors.EXIT_FOLDER_IN_USE == 4
        assert read_lock_holder(out)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_lock_of_a_sigkilled_holder_does_not_block(tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # its record is still there ...
    assert read_lock_holder(out) is None  # ... but nobody holds the lock
    t0 = time.monotonic()
    with acquire_output_lock(out, command=["next"]) as lock:
        assert lock.held and time.monotonic() - t0 < 1.0
        assert read_lock_holder(out)["command"] == ["next"]


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(errors.BadFileError, match="--output_dir"):
        acquire_output_lock(blocker / "out", command=["x"])


def test_entry_script_exits_4_before_loading_models(tiny_models, tmp_path, venv_python):
    _, toml = make_dataset(tmp_path, count=2, size=64)
    out = tmp_path / "out"
    holder = start_holder(out)
    try:
        t0 = time.monotonic()
        proc = subprocess.run([venv_python, str(SCRIPT), *trainer_args(tiny_models, toml, out, "--max_train_steps",
                                                                      "1")],
                              capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == errors.EXIT_FOLDER_IN_USE, proc.stderr[-2000:]
    assert f"is in use by another trainer (pid {holder.pid}" in proc.stderr and "holder-cmd" in proc.stderr
    assert "Traceback" not in proc.stderr and "preparing accelerator" not in proc.stdout
    assert elapsed < 15, elapsed  # ~3 s idle (python + torch import for the settings, then the lock)
    assert not (out / "heartbeat.json").exists()  # it touched nothing of the running trainer's
