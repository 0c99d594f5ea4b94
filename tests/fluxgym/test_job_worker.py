"""The worker with the stand-in trainer: recovery (pid reuse, adoption), stop requests, failures, disk full."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fg_helpers import STAND_IN, fake_models, make_images
from fluxgym.cli import main
from fluxgym.generate import GenerateOptions, REPO_ROOT
from fluxgym.jobs import JobStore, commands
from fluxgym.jobs.worker import Worker
from fluxgym.naming import project_paths
from fluxgym.prepare import prepare_dataset
from fluxgym.supervise import Deadlines, ProcessRecord, RestartPolicy, Supervisor, read_events

fast = functools.partial(Supervisor, check_interval=0.2)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXGYM_PYTHON", sys.executable)
    monkeypatch.setenv("FG_RECORD", str(tmp_path / "record.json"))
    monkeypatch.setenv("FG_MODE", "ok")
    return monkeypatch


def stand_in_job(root, name: str):
    paths = project_paths(root, name)
    prepare_dataset(make_images(root.parent / f"src-{paths.slug}", 2), paths.dataset_dir, trigger="tok",
                    resolution=64)
    fake_models(root)
    job = commands.submit(root, GenerateOptions(name=name, root=root, vram="cpu", base_model="demo", trigger="tok",
                                                trainer_script=STAND_IN, launcher="python"))
    return job, paths


def _events(job):
    return [e for e in read_events(job.events_file, job.events_offset)[0] if e.get("job") == job.id]


def test_pid_reused_by_another_process_is_never_adopted_nor_killed(root, stand_in):
    job, paths = stand_in_job(root, "Reused")
    store = JobStore.open(root)
    # An unrelated process now holds the pid the store remembers (as after a reboot): same pid, other start time.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        born = psutil.Process(other.pid).create_time()
        store.transition(job.id, "running", pid=other.pid, pgid=other.pid, create_time=born - 3600.0)
        assert Worker(root, recover=False, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
        after = store.get(job.id)
        assert after.state == "interrupted" and after.restart_reasons[-1]["reason"] == "interrupted"
        assert other.poll() is None  # --no-recover: left interrupted, and the stranger was not touched
        assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    done = store.get(job.id)
    assert done.state == "done" and done.lora_file == str(paths.final_lora) and done.restarts == 1
    assert [h[1] for h in store.history(job.id)] == ["queued", "running", "interrupted", "queued", "running", "done"]
    argv = json.loads((root.parent / "record.json").read_text())["argv"]
    assert argv[-2:] == ["--resume", "auto"]  # recovery resumes from the newest valid checkpoint


def test_live_run_is_adopted_and_never_started_twice(root, stand_in, tmp_path):
    job, paths = stand_in_job(root, "Adopted")
    store = JobStore.open(root)
    env = dict(os.environ, FG_MODE="slow", FG_SLEEP="2", FG_RECORD=str(tmp_path / "first.json"))
    with open(paths.out("train.log"), "ab") as log:
        run = subprocess.Popen([sys.executable, str(STAND_IN), "--output_dir", str(paths.output_dir),
                                "--output_name", paths.slug], env=env, stdout=log, stderr=log,
                               start_new_session=True)
    rec = ProcessRecord.of(run.pid)
    store.transition(job.id, "running", pid=rec.pid, pgid=rec.pgid, create_time=rec.create_time)
    stand_in.setenv("FG_RECORD", str(tmp_path / "second.json"))  # written only if the job were launched again
    try:
        assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
    finally:
        run.wait(timeout=30)
    after = store.get(job.id)
    assert after.state == "done" and after.lora_file == str(paths.final_lora) and after.restarts == 0
    assert not (tmp_path / "second.json").exists()
    kinds = [e["event"] for e in _events(after)]
    assert "attached" in kinds and "started" not in kinds and kinds[-1] == "done"


def test_cancel_ends_the_whole_tree_and_a_second_worker_is_refused(root, stand_in, tmp_path, capsys):
    job, _ = stand_in_job(root, "Cancelled")
    stand_in.setenv("FG_MODE", "spawn")
    stand_in.setenv("FG_PIDS", str(tmp_path / "pids.json"))
    worker = Worker(root, poll=0.2, grace=2.0, supervisor_factory=fast)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pids.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = json.loads((tmp_path / "pids.json").read_text())
        assert main(["worker", "--until-idle", "--root", str(root)]) == 4
        assert f"pid {os.getpid()}" in capsys.readouterr().err
        t0 = time.monotonic()
        commands.cancel(root, job.id)
        store = JobStore.open(root)
        while store.get(job.id).state != "stopped" and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        assert store.get(job.id).state == "stopped"
        assert time.monotonic() - t0 < 2.0 + 2.0 + 5.0  # poll + grace + KILL confirmation
        for pid in pids.values():  # the grandchild ignores TERM and left nothing behind either
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        worker.close(grace=2.0)


def test_failed_job_records_the_error_and_retry_continues_it(root, stand_in, tmp_path, capsys):
    job, paths = stand_in_job(root, "Flaky")
    stand_in.setenv("FG_MODE", "fail")
    assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 1
    assert main(["queue", "list", "--json", "--root", str(root)]) == 0
    (row,) = json.loads(capsys.readouterr().out)["jobs"]
    assert row["state"] == "failed" and "something broke" in row["error"]
    # The supervisor's restart policy tried again before giving up; each restart is on the job with its reason.
    assert row["restarts"] >= 1 and {r["reason"] for r in row["restart_reasons"]} == {"crash"}
    stand_in.setenv("FG_MODE", "ok")
    assert main(["queue", "retry", str(job.id), "--root", str(root)]) == 0
    assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
    after = JobStore.open(root).get(job.id)
    assert after.state == "done" and after.error is None and after.lora_file == str(paths.final_lora)


def test_disk_full_on_the_store_while_a_job_runs_keeps_its_output(root, stand_in):
    job, paths = stand_in_job(root, "Full Disk")
    env = dict(os.environ, FG_MODE="slow", FG_SLEEP="1", FLUXGYM_INJECT_STORE_FULL="2")
    proc = subprocess.run([sys.executable, "-m", "fluxgym", "worker", "--until-idle", "--root", str(root)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    db = JobStore.path_for(root)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "disk full" in proc.stderr and str(db) in proc.stderr
    assert paths.final_lora.is_file()  # the training ran to its end; nothing was killed
    store = JobStore.open(root)
    assert store.get(job.id).state == "running"  # the last state that could be written
    assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0  # space is back
    after = store.get(job.id)
    assert after.state == "done" and after.lora_file == str(paths.final_lora)
    assert [h[1] for h in store.history(job.id)].count("running") == 1  # finished, not run again


def test_out_of_memory_retry_is_recorded_and_kept_for_a_later_resume(root, stand_in):
    job, paths = stand_in_job(root, "Big Model")
    stand_in.setenv("FG_MODE", "oom_once")
    assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
    store = JobStore.open(root)
    after = store.get(job.id)
    assert after.state == "done" and after.blocks_to_swap == 6 and after.restarts == 1
    assert after.restart_reasons[0]["reason"] == "oom"
    assert "recovering" in [h[1] for h in store.history(job.id)]
    # Interrupted later: the relaunch keeps the raised block swap instead of dying of OOM again.
    spec = Worker(root)._spec(after, None)
    assert spec.argv[-2:] == ["--blocks_to_swap", "6"] and spec.blocks_to_swap == 6


def test_stall_restart_and_give_up_are_job_transitions(root, stand_in, tmp_path):
    job, _ = stand_in_job(root, "Frozen")
    stand_in.setenv("FG_MODE", "spawn")  # prints one line, then never progresses
    stand_in.setenv("FG_PIDS", str(tmp_path / "pids.json"))
    quick = Deadlines(loading=0.6, caching=0.6, stuck_threshold=0.6, first_step=0.6)
    worker = Worker(root, poll=0.2, grace=0.3, deadlines=quick, policy=RestartPolicy(max_restarts=1),
                    supervisor_factory=functools.partial(Supervisor, check_interval=0.2, kill_grace=0.3,
                                                         dump_wait=0.5))
    assert worker.run_until_idle() == 1
    store = JobStore.open(root)
    after = store.get(job.id)
    assert [h[1] for h in store.history(job.id)] == ["queued", "running", "stalled", "recovering", "running",
                                                    "stalled", "failed"]
    assert after.restarts == 1 and after.restart_reasons[0]["reason"] == "stall"
    assert "stall" in after.error and after.pid is None
    for pid in json.loads((tmp_path / "pids.json").read_text()).values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_one_job_per_gpu_side_by_side(root, stand_in):
    jobs = [stand_in_job(root, name) for name in ("On Zero", "On One", "Third")]
    stand_in.setenv("FG_MODE", "slow")
    stand_in.setenv("FG_SLEEP", "0.6")
    assert Worker(root, gpus=["0", "1"], poll=0.2, supervisor_factory=fast).run_until_idle() == 0
    store = JobStore.open(root)
    rows = [store.get(job.id) for job, _ in jobs]
    assert [r.state for r in rows] == ["done"] * 3
    assert [r.gpu for r in rows[:2]] == ["0", "1"] and rows[2].gpu in ("0", "1")
    for row, (_, paths) in zip(rows, jobs):  # each trainer saw only its own GPU
        beat = json.loads(paths.out("heartbeat.json").read_text())
        assert beat["message"] == f"CUDA_VISIBLE_DEVICES={row.gpu}"
    assert rows[1].started < rows[0].finished  # the first two ran at the same time
    assert rows[2].started >= min(rows[0].finished, rows[1].finished)  # the third waited for a free GPU


def test_closing_the_worker_interrupts_its_runs_and_the_next_one_resumes_them(root, stand_in, tmp_path):
    job, paths = stand_in_job(root, "Hosted")
    stand_in.setenv("FG_MODE", "spawn")
    stand_in.setenv("FG_PIDS", str(tmp_path / "pids.json"))
    worker = Worker(root, poll=0.2, grace=1.0, supervisor_factory=fast)
    worker.start()  # as the web UI hosts it
    deadline = time.monotonic() + 30
    while not (tmp_path / "pids.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.close(grace=1.0)
    store = JobStore.open(root)
    assert store.get(job.id).state == "interrupted"
    for pid in json.loads((tmp_path / "pids.json").read_text()).values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    stand_in.setenv("FG_MODE", "ok")
    assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
    assert store.get(job.id).state == "done"
    assert json.loads((root.parent / "record.json").read_text())["argv"][-2:] == ["--resume", "auto"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_disk_full_on_the_event_file_keeps_the_job_and_its_output(root, stand_in, caplog):
    job, paths = stand_in_job(root, "No Space")
    events = paths.out("events.jsonl")
    events.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with caplog.at_level("ERROR"):
        assert Worker(root, poll=0.2, supervisor_factory=fast).run_until_idle() == 0
    after = JobStore.open(root).get(job.id)
    assert after.state == "done" and after.lora_file == str(paths.final_lora)  # the store still heard every event
    assert paths.final_lora.read_bytes() == b"stand-in lora"
    assert any("No space left on device" in r.getMessage() and str(events) in r.getMessage() for r in caplog.records)


def test_a_store_locked_for_a_while_is_waited_out(root, stand_in):
    job, _ = stand_in_job(root, "Patient")
    other = sqlite3.connect(JobStore.path_for(root), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # e.g. a database browser holding the write lock
    release = threading.Timer(1.5, lambda: (other.execute("ROLLBACK"), other.close()))
    release.start()
    t0 = time.monotonic()
    try:
        assert Worker(root, poll=0.2, store_timeout=0.2, supervisor_factory=fast).run_until_idle() == 0
    finally:
        release.join()
    assert time.monotonic() - t0 >= 1.5  # it did not give up, nor call the queue empty, while locked
    assert JobStore.open(root).get(job.id).state == "done"


def test_a_closed_terminal_does_not_end_the_worker_or_its_run(root, stand_in):
    job, paths = stand_in_job(root, "Dropped Ssh")
    env = dict(os.environ, FG_MODE="slow", FG_SLEEP="2")
    proc = subprocess.Popen([sys.executable, "-m", "fluxgym", "worker", "--until-idle", "--root", str(root)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    store = JobStore.open(root)
    deadline = time.monotonic() + 30
    while store.get(job.id).pid is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)  # what an ssh session that drops sends
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]
    after = store.get(job.id)
    assert after.state == "done" and after.restarts == 0 and after.lora_file == str(paths.final_lora)
