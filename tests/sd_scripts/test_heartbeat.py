"""heartbeat.json: schema, atomic replacement under a concurrent reader, and no exceptions on I/O errors."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from library.heartbeat import FILE_NAME, PHASES, Heartbeat, read_heartbeat

SCHEMA = {
    "version": int, "pid": int, "phase": str, "step": int, "total_steps": int, "epoch": int,
    "total_epochs": int, "time": float, "phase_started": float, "message": str,
}


def test_schema_and_state_transitions(tmp_path):
    hb = Heartbeat(tmp_path / "out")  # the directory does not exist yet
    hb.set_totals(40, 4)
    hb.phase("caching_latents", "caching latents...")
    data = read_heartbeat(tmp_path / "out")
    assert data is not None
    for key, typ in SCHEMA.items():
        assert isinstance(data[key], typ), key
    assert data["last_checkpoint"] is None
    assert data["version"] == 1 and data["pid"] == os.getpid()
    assert (data["phase"], data["total_steps"], data["total_epochs"]) == ("caching_latents", 40, 4)

    started = data["phase_started"]
    time.sleep(0.01)
    hb.phase("training")
    hb.step(7, 2)
    hb.checkpoint(tmp_path / "out" / "x-000001-state")
    data = read_heartbeat(tmp_path / "out")
    assert (data["phase"], data["step"], data["epoch"]) == ("training", 7, 2)
    assert data["phase_started"] > started and data["time"] >= data["phase_started"]
    assert data["last_checkpoint"].endswith("x-000001-state")

    hb.failed("HANG GUARD [save]: boom")
    assert read_heartbeat(tmp_path / "out")["phase"] == "failed"
    hb.done()
    assert read_heartbeat(tmp_path / "out")["phase"] == "done"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [FILE_NAME]  # no temp files left


def test_stale_temp_file_from_killed_run_is_removed(tmp_path):
    (tmp_path / f".{FILE_NAME}.tmp-99999").write_text('{"half": ')
    Heartbeat(tmp_path).phase("loading")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]


def test_unknown_phase_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        Heartbeat(tmp_path).phase("thinking")
    assert set(PHASES) >= {"loading", "training", "failed", "done"}


def test_concurrent_reader_never_sees_partial_json(tmp_path):
    hb = Heartbeat(tmp_path)
    hb.phase("training", "x" * 20000)  # large enough that a non-atomic write would be seen half done
    stop = threading.Event()
    bad: list[str] = []
    reads = [0]

    def reader():
        path = tmp_path / FILE_NAME
        while not stop.is_set():
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                json.loads(text)
            except ValueError:
                bad.append(text[:80])
            reads[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    for step in range(1500):
        hb.step(step, step // 100)
    stop.set()
    t.join()
    assert reads[0] > 50 and not bad
    assert read_heartbeat(tmp_path)["step"] == 1499


def test_reader_in_another_process_sees_only_whole_files(tmp_path, venv_python):
    code = (
        "import json,sys,time\n"
        "p=sys.argv[1]+'/heartbeat.json'; end=time.time()+1.5; n=0\n"
        "while time.time()<end:\n"
        "    json.load(open(p)); n+=1\n"
        "print(n)\n"
    )
    hb = Heartbeat(tmp_path)
    hb.phase("training", "y" * 50000)
    proc = subprocess.Popen([venv_python, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    step = 0
    while proc.poll() is None:
        step += 1
        hb.step(step, 0)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert int(out) > 10


def test_io_errors_are_logged_once_never_raised(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output directory should be")
    hb = Heartbeat(blocker)
    with caplog.at_level("WARNING", logger="library.heartbeat"):
        for s in range(5):
            hb.step(s, 0)
        hb.failed("x")
    assert len([r for r in caplog.records if "could not write heartbeat" in r.getMessage()]) == 1
    assert hb.snapshot()["phase"] == "failed"
    assert read_heartbeat(blocker) is None


def test_min_interval_throttles_steps_but_not_phase_changes(tmp_path):
    hb = Heartbeat(tmp_path, min_interval=3600)
    hb.step(1, 0)  # first write allowed (last write long ago)
    hb.step(2, 0)
    assert read_heartbeat(tmp_path)["step"] == 1
    hb.phase("saving")
    assert read_heartbeat(tmp_path)["step"] == 2  # phase change writes the latest step too


def test_read_heartbeat_handles_garbage(tmp_path):
    assert read_heartbeat(tmp_path) is None
    (tmp_path / FILE_NAME).write_text("{not json")
    assert read_heartbeat(tmp_path) is None
    (tmp_path / FILE_NAME).write_text("[1, 2]")
    assert read_heartbeat(tmp_path) is None


def test_module_is_stdlib_only(venv_python, repo_root):
    code = (
        "import sys; sys.path.insert(0, 'sd-scripts'); import library.heartbeat, library.hang_guards\n"
        "bad=[m for m in ('torch','numpy','diffusers','transformers','accelerate') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([venv_python, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
