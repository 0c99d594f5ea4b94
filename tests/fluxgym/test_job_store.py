"""The job store: the transition table, schema migration, damaged/locked/full database files, queue commands."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fg_helpers import STAND_IN, fake_models, make_images
from fluxgym.cli import main
from fluxgym.jobs import JOB_STATES, TRANSITIONS, IllegalTransition, JobStore, StoreError
from fluxgym.jobs import commands
from fluxgym.jobs import schema
from fluxgym.jobs.lock import WorkerBusyError, WorkerLock
from fluxgym.jobs.store import StoreCorruptError, StoreFullError, StoreLockedError


def _add(store: JobStore, lora: str = "a", **kw):
    kw.setdefault("settings", {"k": 1})
    return store.add(lora=lora, name=lora, launch=["bash", "x.sh"], argv=["--seed", "1"],
                     output_dir=str(store.path.parent / lora), **kw)


def _force_state(store: JobStore, job_id: int, state: str) -> None:
    # Test set-up only: put a row straight into `state` to probe the table from there.
    store.conn.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))


def test_every_transition_outside_the_table_raises_and_changes_nothing(tmp_path):
    store = JobStore.open(tmp_path, backup=False)
    job = _add(store)
    checked = 0
    for old in JOB_STATES:
        for new in JOB_STATES:
            _force_state(store, job.id, old)
            if new in TRANSITIONS[old]:
                assert store.transition(job.id, new).state == new
            else:
                with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
                    store.transition(job.id, new)
                assert store.get(job.id).state == old
                checked += 1
    assert checked == len(JOB_STATES) ** 2 - sum(len(v) for v in TRANSITIONS.values()) == 39
    with pytest.raises(IllegalTransition, match="not a job state"):
        store.transition(job.id, "paused")
    with pytest.raises(ValueError, match="transition"):
        store.update(job.id, state="done")  # progress writes can never change the state


def test_transitions_are_logged_and_stamp_times(tmp_path):
    store = JobStore.open(tmp_path)
    job = _add(store)
    store.transition(job.id, "running", why="launched")
    done = store.transition(job.id, "done", lora_file="/x.safetensors")
    assert done.started and done.finished >= done.started and done.lora_file == "/x.safetensors"
    assert store.history(job.id) == [("", "queued", "added"), ("queued", "running", "launched"),
                                     ("running", "done", None)]
    d = done.to_dict()
    for key in ("id", "lora", "state", "phase", "step", "total_steps", "epoch", "last_checkpoint", "lora_file",
                "restarts", "error", "events_file", "events_offset", "gpu", "blocks_to_swap", "pid", "argv"):
        assert key in d


def test_schema_migrates_forward_and_refuses_a_newer_store(tmp_path, monkeypatch):
    store = JobStore.open(tmp_path)
    job = _add(store)
    store.close()
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + ["ALTER TABLE jobs ADD COLUMN note TEXT"])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    again = JobStore.open(tmp_path)
    assert again.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert again.get(job.id).lora == "a"
    again.conn.execute("PRAGMA user_version = 9")
    again.close()
    with pytest.raises(StoreError, match=r"schema version 9, newer"):
        JobStore.open(tmp_path)


@pytest.mark.parametrize("damage", ["header", "page"])
def test_damaged_store_names_the_file_and_repair_restores_every_job(tmp_path, damage, capsys):
    store = JobStore.open(tmp_path)
    ids = [_add(store, f"l{i}").id for i in range(3)]
    store.transition(ids[0], "running")
    store.transition(ids[0], "done", lora_file="/l0.safetensors")
    store.close()
    path = JobStore.path_for(tmp_path)
    assert path.with_name(path.name + ".bak").is_file()
    for extra in ("-wal", "-shm"):
        path.with_name(path.name + extra).unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    start = 0 if damage == "header" else 4096  # the file header, or the first page after it
    data[start:start + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError) as exc:
        JobStore.open(tmp_path)
    msg = str(exc.value)
    assert str(path) in msg and "queue repair" in msg and ".bak" in msg
    assert main(["queue", "list", "--root", str(tmp_path)]) == 5
    assert str(path) in capsys.readouterr().err
    assert main(["queue", "repair", "--root", str(tmp_path)]) == 0
    assert list(path.parent.glob("jobs.sqlite3.damaged-*"))  # the damaged file is kept, not deleted
    capsys.readouterr()
    assert main(["queue", "list", "--json", "--root", str(tmp_path)]) == 0
    jobs = {j["id"]: j for j in json.loads(capsys.readouterr().out)["jobs"]}
    assert sorted(jobs) == ids
    assert jobs[ids[0]]["state"] == "done" and jobs[ids[0]]["lora_file"] == "/l0.safetensors"


def test_locked_store_names_the_file_and_changes_nothing(tmp_path):
    store = JobStore.open(tmp_path, timeout=0.2)
    job = _add(store)
    other = sqlite3.connect(JobStore.path_for(tmp_path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holding the write lock
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as exc:
            store.transition(job.id, "running")
        assert time.monotonic() - t0 < 5
        assert str(store.path) in str(exc.value) and "try again" in str(exc.value)
        assert store.get(job.id).state == "queued"  # reads still work under WAL
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.transition(job.id, "running").state == "running"


def test_disk_full_on_the_store_is_a_clear_error_and_keeps_every_job(tmp_path):
    store = JobStore.open(tmp_path)
    first = _add(store)
    store.transition(first.id, "running")
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    # Injected disk full: SQLite's own size cap raises the same SQLITE_FULL a full disk does.
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreFullError) as exc:
        for i in range(200):
            _add(store, f"big{i}", settings={"pad": "x" * 4000})
    assert "disk full" in str(exc.value) and str(store.path) in str(exc.value)
    assert store.get(first.id).state == "running"
    store.conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert store.transition(first.id, "done").state == "done"
    assert {j.state for j in JobStore.open(tmp_path).list()} >= {"done"}


def test_second_worker_lock_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    store_dir = JobStore.path_for(tmp_path).parent
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from fluxgym.jobs.lock import WorkerLock\n"
            "from pathlib import Path; WorkerLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); "
            "time.sleep(60)")
    repo = str(STAND_IN.parents[2])
    holder = subprocess.Popen([sys.executable, "-c", code, str(store_dir), repo], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkerBusyError) as exc:
            WorkerLock(store_dir).acquire()
        assert exc.value.pid == holder.pid and f"pid {holder.pid}" in str(exc.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = WorkerLock(store_dir)
    lock.acquire()  # no stale lock after kill -9
    lock.release()


def _prepare(root, name="My LoRA"):
    from fluxgym.naming import project_paths
    from fluxgym.prepare import prepare_dataset

    paths = project_paths(root, name)
    prepare_dataset(make_images(root.parent / f"src-{paths.slug}", 3), paths.dataset_dir, trigger="tok",
                    resolution=64)
    return paths


def test_queue_commands_through_the_cli(root, capsys):
    fake_models(root)
    paths = _prepare(root)
    add = ["queue", "add", "My LoRA", "--vram", "cpu", "--base-model", "demo", "--trainer-script", str(STAND_IN),
           "--launcher", "python", "--epochs", "2", "--root", str(root)]
    assert main(add) == 0
    assert main(add) == 2  # a second job for the same LoRA would share its output folder
    assert "already has job 1" in capsys.readouterr().err
    assert main(["queue", "list", "--json", "--root", str(root)]) == 0
    (job,) = json.loads(capsys.readouterr().out)["jobs"]
    assert (job["id"], job["lora"], job["state"], job["total_steps"]) == (1, paths.slug, "queued", 3 * 10 * 2)
    script = root / "outputs" / ".fluxgym" / "jobs" / "1" / "train.sh"
    assert job["launch"] == ["bash", str(script)] and script.read_text() == paths.out("train.sh").read_text()
    assert "--max_train_epochs" in job["argv"] and job["settings"]["generate"]["epochs"] == 2
    assert main(["queue", "cancel", "1", "--root", str(root)]) == 0
    assert main(["queue", "cancel", "1", "--root", str(root)]) == 3  # nothing left to cancel
    assert main(["queue", "retry", "99", "--root", str(root)]) == 2
    assert main(["queue", "resume", "1", "--checkpoint", str(root), "--root", str(root)]) == 2
    assert "not a usable state folder" in capsys.readouterr().err
    assert main(["queue", "retry", "1", "--root", str(root)]) == 0
    store = JobStore.open(root)
    assert store.get(1).state == "queued" and store.get(1).resume_from == "auto"
    assert [h[1] for h in store.history(1)] == ["queued", "stopped", "queued"]
    paths.final_lora.write_bytes(b"lora")
    assert main(["queue", "cancel", "1", "--root", str(root)]) == 0
    assert main(["queue", "delete", "1", "--root", str(root)]) == 0
    assert store.get(1) is None and not script.exists() and paths.final_lora.is_file()


def test_cancel_of_a_running_job_is_a_request_the_worker_carries_out(tmp_path):
    store = JobStore.open(tmp_path)
    job = _add(store)
    store.transition(job.id, "running")
    after = commands.cancel(tmp_path, job.id)
    assert after.state == "running" and after.stop_requested is not None
    with pytest.raises(ValueError, match="cancel it before deleting"):
        commands.delete(tmp_path, job.id)
