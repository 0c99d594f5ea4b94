"""fluxgym.supervise with the stand-in trainer (tests/tools/fake_trainer.py): records, the OOM ladder, per-rank
stalls, events and hints. The real-trainer faults are in test_supervise_faults.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fluxgym.supervise import (Deadlines, ProcessRecord, RestartPolicy, RunSpec, Supervisor, process_alive,
                               read_events, stop_tree)
from fluxgym.supervise.drain import LogFollower
from fluxgym.supervise.policy import blocks_to_swap_in, next_blocks_to_swap
from fluxgym.supervise.progress import ProgressTracker

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "tools" / "fake_trainer.py"


def fake_spec(out: Path, *fake_args: str, **kw) -> RunSpec:
    argv = [sys.executable, str(FAKE), "--output-dir", str(out), "--output-name", "fake", *fake_args]
    return RunSpec(argv=argv, cwd=REPO, output_dir=out, output_name="fake", **kw)


def supervise(spec: RunSpec, policy: RestartPolicy | None = None, **deadlines) -> tuple[object, list[dict]]:
    events: list[dict] = []
    sup = Supervisor(spec, deadlines=Deadlines(**deadlines), policy=policy, on_event=events.append,
                     check_interval=0.1, kill_grace=1.0, dump_wait=1.0)
    return sup.run(), events


def launches(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "fake-launches.jsonl").read_text().splitlines()]


def kinds(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def _gone(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


def test_a_reused_pid_is_never_killed():
    """A record whose pid now belongs to an unrelated process (other start time) ends nothing, not even
    that process's group; the right record ends the whole group."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(other.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(other.pid).children()[0]
        born = psutil.Process(other.pid).create_time()
        stale = ProcessRecord(other.pid, other.pid, born - 3600.0)  # "our" run from before a reboot
        assert not process_alive(stale)
        assert stop_tree(stale, grace=0.5) == []
        assert other.poll() is None and child.is_running()  # never touched
        assert stop_tree(ProcessRecord(other.pid, None, None), grace=0.5) == []  # unknown start time: not ours
        assert other.poll() is None
        mine = ProcessRecord(other.pid, other.pid, born)
        assert process_alive(mine)
        assert stop_tree(mine, grace=1.0) == []
        other.wait(5)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if other.poll() is None:
            other.kill()


def test_oom_ladder_arithmetic_and_where_the_value_comes_from(tmp_path):
    assert next_blocks_to_swap(None, 35, 6) == 6
    assert next_blocks_to_swap(30, 35, 6) == 35  # the last rung is the model's top, not past it
    assert next_blocks_to_swap(35, 35, 6) is None
    script = tmp_path / "train.sh"
    script.write_text('#!/bin/bash\npython t.py \\\n  --blocks_to_swap 18 \\\n  --lr 1 "$@"\n')
    assert blocks_to_swap_in(["bash", str(script)]) == 18
    assert blocks_to_swap_in(["bash", str(script), "--blocks_to_swap", "24"]) == 24  # argparse keeps the last
    assert blocks_to_swap_in(["python", "t.py", "--split_mode"]) == 18
    assert blocks_to_swap_in(["python", "t.py"]) is None


@pytest.mark.parametrize("oom_below,expect", [(7, "done"), (99, "failed")])
def test_oom_climbs_the_block_swap_ladder(tmp_path, oom_below, expect):
    out = tmp_path / "run"
    spec = fake_spec(out, "--steps", "6", "--step-time", "0.01", "--save-every", "2", "--fault", "oom",
                     "--fault-at", "5", "--fault-times", "99", "--oom-below", str(oom_below), max_blocks_to_swap=12)
    outcome, events = supervise(spec, RestartPolicy(max_restarts=0))  # OOM retries follow the ladder, not the cap
    runs = launches(out)
    swaps = [r["argv"][r["argv"].index("--blocks_to_swap") + 1] if "--blocks_to_swap" in r["argv"] else None
             for r in runs]
    assert outcome.state == expect
    assert all(r["argv"][-2:] == ["--resume", str(out / "fake-step00000004-state")] for r in runs[1:])
    retries = kinds(events, "oom_retry")
    if expect == "done":
        assert swaps == [None, "6", "12"] and [e["blocks_to_swap"] for e in retries] == [6, 12]
        assert [r["reason"] for r in outcome.restarts] == ["oom", "oom"] and outcome.lora_file == out / "fake.safetensors"
    else:
        assert swaps == [None, "6", "12"]  # the top (12 here) is tried, then no more
        assert "tried 0 -> 6 -> 12" in outcome.error and "out of GPU memory" in outcome.error
        assert "lower the resolution" in outcome.hint
        assert kinds(events, "failed")[0]["error"] == outcome.error


def _beat(out: Path, name: str, **fields) -> None:
    hb = {"version": 1, "pid": 1, "phase": "training", "step": 1, "time": time.time(), **fields}
    (out / name).write_text(json.dumps(hb))


def test_a_rank_that_stops_moving_is_a_stall_and_stopped_is_never_one(tmp_path):
    now = [100.0]
    tracker = ProgressTracker(tmp_path, Deadlines(stuck_threshold=5.0, first_step=5.0), clock=lambda: now[0])
    for step in range(1, 8):  # rank 0 keeps moving (it never waits on rank 1 in this picture), rank 1 froze
        _beat(tmp_path, "heartbeat.json", step=step)
        if step == 1:
            _beat(tmp_path, "heartbeat-rank1.json", step=1)
        tracker.poll()
        assert step < 7 or tracker.check() is not None
        now[0] += 1.0
    stall = tracker.check()
    assert stall is not None and stall.rank == 1 and stall.step == 1 and stall.idle_s > 5.0
    assert any(line.startswith("rank 1: phase training step 1") for line in tracker.rank_lines())
    _beat(tmp_path, "heartbeat-rank1.json", step=1, phase="stopped")  # ended by a signal: terminal, no stall
    _beat(tmp_path, "heartbeat.json", step=7, phase="stopped")
    tracker.poll()
    now[0] += 60.0
    assert tracker.check() is None


def test_events_file_and_reader(tmp_path):
    out = tmp_path / "run"
    (out / "sample").mkdir(parents=True)
    old = out / "sample" / "fake_000001_00.png"
    old.write_bytes(b"an earlier run's sample")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    new = out / "sample" / "fake_000010_00.png"
    writer = threading.Timer(1.0, lambda: new.write_bytes(b"png"))  # a sample written during this run
    writer.start()
    outcome, events = supervise(fake_spec(out, "--steps", "30", "--step-time", "0.1", "--save-every", "10",
                                          job_id=7))
    assert outcome.state == "done"
    on_disk, offset = read_events(out / "events.jsonl")
    assert on_disk == [json.loads(json.dumps(e, default=str)) for e in events]
    assert offset == (out / "events.jsonl").stat().st_size
    assert {e["job"] for e in on_disk} == {7} and len({e["run"] for e in on_disk}) == 1
    seen = [e["event"] for e in on_disk]
    assert seen[0] == "started" and seen[-1] == "done" and "phase" in seen
    steps = kinds(on_disk, "step")
    assert len(steps) >= 2 and steps[-1]["loss"] == pytest.approx(0.123)  # from the bar's avr_loss=
    assert steps[-1]["total_steps"] == 30 and steps[-1]["it_per_s"] > 0 and steps[-1]["eta_s"] >= 0
    assert [e["path"] for e in kinds(on_disk, "checkpoint")] == [
        str(out / "fake-step00000010-state"), str(out / "fake-step00000020-state")]
    assert [e["path"] for e in kinds(on_disk, "sample")] == [str(new)]  # the earlier run's sample is not news
    with open(out / "events.jsonl", "ab") as fh:  # a writer cut off in the middle of a line
        fh.write(b'{"event": "step", "ti')
    more, offset2 = read_events(out / "events.jsonl", offset)
    assert more == [] and offset2 == offset  # the torn line waits for the next call


@pytest.mark.parametrize("code,resumable", [(1, True), (2, False), (4, False)])
def test_resume_hint_only_for_failures_a_resume_can_fix(tmp_path, code, resumable):
    out = tmp_path / "run"
    spec = fake_spec(out, "--steps", "20", "--step-time", "0.01", "--fault", "crash", "--fault-at", "3",
                     "--fault-times", "9", "--crash-code", str(code), resume_command="python -m fluxgym resume fake")
    outcome, events = supervise(spec, RestartPolicy(auto_resume=False))
    assert outcome.state == "failed" and outcome.exit_code == code and len(launches(out)) == 1
    assert ("python -m fluxgym resume fake" in outcome.hint) is resumable
    assert outcome.error == "RuntimeError: fake trainer crash"
    if code == 2:
        # Bad input is not retried even with auto-resume on: the same input fails the same way.
        outcome, _ = supervise(spec, RestartPolicy(auto_resume=True))
        assert outcome.state == "failed" and not outcome.restarts and len(launches(out)) == 2


def test_stop_from_another_thread_ends_the_tree_without_restart(tmp_path):
    out = tmp_path / "run"
    events: list[dict] = []
    sup = Supervisor(fake_spec(out, "--steps", "400", "--step-time", "0.05", "--spawn-children"),
                     on_event=events.append, check_interval=0.1, kill_grace=1.0)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("out", sup.run()))
    th.start()
    deadline = time.monotonic() + 30
    while not (out / "fake-children.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    rec = sup.process
    sup.stop(grace=1.0)
    th.join(30)
    kids = json.loads((out / "fake-children.json").read_text())
    assert box["out"].state == "stopped" and not box["out"].restarts and len(launches(out)) == 1
    assert kinds(events, "stopped")[0]["by"] == "user"
    assert not process_alive(rec)
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in kids)


def test_every_rank_beats_into_its_own_file_with_the_last_loss(tmp_path):
    from library.heartbeat import Heartbeat, read_heartbeat

    Heartbeat(tmp_path).step(3, 1, loss=0.25)
    Heartbeat(tmp_path, rank=2).step(3, 1)
    assert read_heartbeat(tmp_path)["loss"] == 0.25 and read_heartbeat(tmp_path)["rank"] == 0
    assert (tmp_path / "heartbeat-rank2.json").is_file() and read_heartbeat(tmp_path, 2)["loss"] is None


def test_injected_out_of_memory_fires_at_its_step_below_its_swap(monkeypatch):
    import torch

    from library.fault_injection import inject_point

    monkeypatch.setenv("FLUXTRAIN_INJECT_OOM", "step@3<6")
    inject_point("step", step=2, blocks_to_swap=0)  # another step: nothing
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        inject_point("step", step=3, blocks_to_swap=0)
    inject_point("step", step=3, blocks_to_swap=6)  # enough block swap: the retry gets past it
    monkeypatch.setenv("FLUXTRAIN_INJECT_OOM", "step@3")
    with pytest.raises(torch.OutOfMemoryError):
        inject_point("step", step=3, blocks_to_swap=35)


_SAVES_THEN_LINGERS = """
import json, os, sys, time
out, fresh, linger = sys.argv[1], sys.argv[2] == "fresh", float(sys.argv[3])
if fresh:
    header = b'{"__metadata__":{}}'
    with open(os.path.join(out, "fake.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
with open(os.path.join(out, "heartbeat.json"), "w") as f:
    json.dump({"version": 1, "pid": os.getpid(), "phase": "done", "step": 5, "total_steps": 5, "epoch": 1,
               "time": time.time(), "phase_started": time.time()}, f)
time.sleep(linger)  # teardown after the final save: the moment a restarted worker may re-attach
"""


@pytest.mark.parametrize("fresh", [True, False])
def test_an_adopted_run_is_credited_with_the_lora_it_saved_before_the_re_attach(tmp_path, fresh):
    """The final LoRA counts when written after the adopted process started, even before the re-attach; a
    file older than the process (an earlier run's) never does."""
    out = tmp_path / "run"
    out.mkdir()
    if not fresh:
        (out / "fake.safetensors").write_bytes(b"an earlier run's LoRA")
        os.utime(out / "fake.safetensors", (time.time() - 3600, time.time() - 3600))
    child = subprocess.Popen([sys.executable, "-c", _SAVES_THEN_LINGERS, str(out), "fresh" if fresh else "old",
                              "2.5"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (out / "heartbeat.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.3)  # the LoRA is now more than a second older than the re-attach
        rec = ProcessRecord.of(child.pid)
        sup = Supervisor(RunSpec(argv=[], cwd=REPO, output_dir=out, output_name="fake"), check_interval=0.1)
        outcome = sup.attach(rec)
    finally:
        child.wait(20)
    if fresh:
        assert (outcome.state, outcome.lora_file) == ("done", out / "fake.safetensors"), outcome
    else:
        assert (outcome.state, outcome.ended_by, outcome.lora_file) == ("failed", "no_lora", None), outcome


def test_the_log_follower_reads_from_its_offset_to_the_end_and_starts_over_after_a_truncation(tmp_path):
    log = tmp_path / "train.log"
    log.write_bytes(b"an earlier launch\n")
    fed: list[bytes] = []
    console = io.BytesIO()
    follower = LogFollower(log, fed.append, console, start=log.stat().st_size, interval=0.02)
    with open(log, "ab") as fh:
        fh.write(b"steps:  50%|#####     | 1/2\n")
        fh.flush()
        deadline = time.monotonic() + 10
        while not fed and time.monotonic() < deadline:
            time.sleep(0.01)
        log.write_bytes(b"")  # truncated by hand
        time.sleep(0.1)
        fh.write(b"model saved.\n")  # O_APPEND: at the new end
    assert follower.finish(5.0)
    assert b"".join(fed) == b"steps:  50%|#####     | 1/2\nmodel saved.\n"  # nothing from before `start`
    assert follower.tail.lines() == ["steps:  50%|#####     | 1/2", "model saved."]
    deadline = time.monotonic() + 5
    while console.getvalue() != b"".join(fed) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert console.getvalue() == b"".join(fed)


def test_checkpoint_event_carries_the_checkpoints_own_step(tmp_path):
    """The event's step is the saved state's (its manifest), not the step the heartbeat shows when the
    supervisor next looks (the real trainer has moved on by then: state at step 320 reported as 339)."""
    out = tmp_path / "run"
    outcome, events = supervise(fake_spec(out, "--steps", "60", "--step-time", "0.01", "--save-every", "20"))
    assert outcome.state == "done"
    saved = kinds(events, "checkpoint")
    assert [e["path"] for e in saved] == [str(out / "fake-step00000020-state"), str(out / "fake-step00000040-state")]
    assert [e["step"] for e in saved] == [20, 40]


def test_the_trainers_own_error_line_beats_the_launchers_traceback():
    """Under `accelerate launch` (train.sh's default) every failure ends with the launcher's CalledProcessError;
    `fluxgym train` said "training FAILED: subprocess.CalledProcessError: Command '[...' instead of the cause."""
    from fluxgym.supervise.outcome import first_error_line

    lines = ["error: output folder outputs/x is in use by another trainer (pid 42, running since ...)",
             "Traceback (most recent call last):",
             "    raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)",
             "subprocess.CalledProcessError: Command '['python', 'flux_train_network.py']' returned non-zero exit "
             "status 4."]
    assert first_error_line(lines).startswith("error: output folder outputs/x is in use")
    crash = ["Traceback (most recent call last):", "RuntimeError: shapes do not match",
             "subprocess.CalledProcessError: Command '['python']' returned non-zero exit status 1."]
    assert first_error_line(crash) == "RuntimeError: shapes do not match"  # the trainer's crash, not the launcher's
    assert first_error_line(crash[2:]).startswith("subprocess.CalledProcessError")  # all there is
