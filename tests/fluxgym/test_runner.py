"""The supervised runner: truthful verdicts, a log that never stalls the trainer, and complete stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fg_helpers import setup_lora, stand_in_env
from fluxgym.cli import main
from fluxgym.generate import REPO_ROOT
from fluxgym.models import ModelError
from fluxgym.runner import LAST_RUN, LOG_FILE, PID_FILE, RunError, run_training, stop_run
from fluxgym.status import format_status, run_status
from fluxgym.supervise import ProcessRecord, process_alive, read_events
from fluxgym.supervise.process import read_pid_file, record_from


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for(path: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_success_needs_exit_0_and_the_lora(root, tmp_path):
    paths, _ = setup_lora(root)
    res = run_training(paths, env=stand_in_env(tmp_path, FG_MODE="ok"))
    assert res.success and res.exit_code == 0 and res.lora == paths.final_lora
    assert "stand-in trainer starting" in paths.out(LOG_FILE).read_text()
    assert json.loads(paths.out(LAST_RUN).read_text())["success"] is True
    assert not paths.out(PID_FILE).exists()


def test_exit_1_is_failure_with_error_lines(root, tmp_path):
    paths, _ = setup_lora(root)
    res = run_training(paths, env=stand_in_env(tmp_path, FG_MODE="fail"))
    assert not res.success and res.exit_code == 1
    assert "FAILED" in res.summary and "RuntimeError: something broke" in res.summary
    assert "python -m fluxgym resume my-lora" in res.summary


def test_exit_0_without_lora_is_failure(root, tmp_path):
    paths, _ = setup_lora(root)
    # A LoRA left by an earlier run must not make this run look successful.
    paths.final_lora.write_bytes(b"old")
    os.utime(paths.final_lora, (time.time() - 3600, time.time() - 3600))
    res = run_training(paths, env=stand_in_env(tmp_path, FG_MODE="nolora"))
    assert not res.success and res.exit_code == 0 and res.lora is None
    assert "did not write" in res.summary
    assert main(["status", "my-lora", "--root", str(root)]) == 0


def test_output_flood_does_not_stall(root, tmp_path):
    paths, _ = setup_lora(root)
    t0 = time.monotonic()
    box = {}
    with open(os.devnull, "w") as console:
        env = stand_in_env(tmp_path, FG_MODE="flood", FG_FLOOD_MB=30)
        th = threading.Thread(target=lambda: box.setdefault("res", run_training(paths, echo=console, env=env)))
        th.start()
        th.join(timeout=60)  # a runner that stops draining would block the trainer on a full pipe forever
        if th.is_alive():
            stop_run(paths, grace=1.0)
            th.join(timeout=30)
            pytest.fail("the run stalled under a 30 MB output flood")
    elapsed = time.monotonic() - t0
    res = box["res"]
    assert res.success, res.summary
    assert paths.out(LOG_FILE).stat().st_size >= 30 * 1024 * 1024
    assert elapsed < 30, f"30 MB of output took {elapsed:.1f} s"


def test_missing_model_files_fail_before_launch(root, tmp_path):
    paths, _ = setup_lora(root, models=False, base_model="flux-dev")
    with pytest.raises(ModelError) as exc:
        run_training(paths, env=stand_in_env(tmp_path))
    msg = str(exc.value)
    for f in ("flux1-dev.sft", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.sft"):
        assert f in msg
    assert "python -m fluxgym models download flux-dev" in msg
    assert not (tmp_path / "record.json").exists()
    assert main(["train", "my-lora", "--root", str(root)]) == 2


def _start_in_thread(paths, env):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", run_training(paths, env=env, grace=1.0)))
    th.start()
    return th, box


@pytest.mark.parametrize("mode", ["spawn", "ignore_term"])
def test_stop_ends_the_whole_tree(root, tmp_path, mode):
    paths, _ = setup_lora(root)
    pids_file = tmp_path / "pids.json"
    th, box = _start_in_thread(paths, stand_in_env(tmp_path, FG_MODE=mode, FG_PIDS=pids_file))
    pids = _wait_for(pids_file)
    with pytest.raises(RunError, match="already training"):
        run_training(paths, env=stand_in_env(tmp_path))
    assert run_status(paths)["state"] == "running"
    running, left = stop_run(paths, grace=1.0)
    assert running and left == []
    th.join(timeout=30)
    assert not th.is_alive()
    assert _gone(pids["trainer"]) and _gone(pids["grandchild"])
    res = box["res"]
    assert res.stopped and not res.success
    assert run_status(paths)["state"] == "stopped"


def test_ctrl_c_ends_the_whole_tree(root, tmp_path):
    paths, _ = setup_lora(root)
    pids_file = tmp_path / "pids.json"
    env = stand_in_env(tmp_path, FG_MODE="spawn", FG_PIDS=pids_file)
    runner = subprocess.Popen([sys.executable, "-m", "fluxgym", "train", "my-lora", "--root", str(root),
                               "--grace", "1", "--quiet"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pids = _wait_for(pids_file)
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1, out.decode()
    assert b"stopped" in out
    assert _gone(pids["trainer"]) and _gone(pids["grandchild"])


def _train_and_wait_for_steps(root, paths, tmp_path) -> tuple[subprocess.Popen, ProcessRecord]:
    """`fluxgym train` with a stand-in that prints a step line every 0.2 s for 3 s; returns once it is training."""
    env = stand_in_env(tmp_path, FG_MODE="slow", FG_SLEEP=3)
    runner = subprocess.Popen([sys.executable, "-m", "fluxgym", "train", "my-lora", "--root", str(root)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    echoed = [runner.stdout.readline() for _ in range(2)]  # the console echo, read back from train.log
    if echoed != [b"stand-in trainer starting\n", b"steps: working\n"]:
        runner.kill()
        raise AssertionError(f"the stand-in never started training: {echoed}")
    return runner, record_from(read_pid_file(paths.out(PID_FILE)))


def test_a_run_outlives_its_killed_supervisor_and_status_says_how_it_ended(root, tmp_path):
    paths, _ = setup_lora(root)
    runner, rec = _train_and_wait_for_steps(root, paths, tmp_path)
    os.kill(runner.pid, signal.SIGKILL)  # the supervisor dies the way a crash or the OOM killer ends it
    runner.communicate(timeout=30)
    assert process_alive(rec)  # same pid, same start time: the trainer did not die with it
    st = run_status(paths)
    assert (st["state"], st["pid"], st["supervised"]) == ("running", rec.pid, False)
    assert "its supervisor is gone" in format_status(st)
    deadline = time.monotonic() + 30
    while process_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(rec)
    log = paths.out(LOG_FILE).read_text()
    assert log.rstrip().endswith("model saved.")  # its output after the kill still reached train.log
    assert paths.final_lora.is_file()
    proc = subprocess.run([sys.executable, "-m", "fluxgym", "status", "my-lora", "--root", str(root), "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    st = json.loads(proc.stdout)
    assert (st["state"], st["lora_file"], st["pid"]) == ("succeeded", str(paths.final_lora), None), st
    started = [e for e in read_events(paths.out("events.jsonl"))[0] if e["event"] == "started"]
    assert len(started) == 1  # it ran once: nothing relaunched it


def test_a_closed_terminal_ends_only_the_console_echo(root, tmp_path):
    paths, _ = setup_lora(root)
    runner, rec = _train_and_wait_for_steps(root, paths, tmp_path)
    runner.send_signal(signal.SIGHUP)  # what an ssh session that drops sends
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, out.decode()[-2000:]
    last = json.loads(paths.out(LAST_RUN).read_text())
    assert last["success"] is True and not last["restarts"] and paths.final_lora.is_file()
    assert not process_alive(rec)


def test_status_reads_heartbeat_and_events(root, tmp_path):
    paths, _ = setup_lora(root)
    run_training(paths, env=stand_in_env(tmp_path, FG_MODE="ok"))
    paths.out(LOG_FILE).unlink()  # status reads events.jsonl and heartbeat.json, not the console text
    hb = {"version": 1, "pid": 1, "phase": "training", "step": 3, "total_steps": 10, "epoch": 1,
          "total_epochs": 4, "time": time.time(), "phase_started": time.time(), "message": "",
          "last_checkpoint": str(paths.output_dir / "my-lora-000002-state")}
    paths.out("heartbeat.json").write_text(json.dumps(hb))
    st = run_status(paths)
    assert st["state"] == "succeeded" and st["step"] == 3 and st["total_steps"] == 10
    text = format_status(st)
    assert "step: 3/10" in text and "my-lora-000002-state" in text and "training finished" in text
    assert st["lora_file"] == str(paths.final_lora)


def test_stop_when_nothing_runs(root):
    setup_lora(root)
    assert main(["stop", "my-lora", "--root", str(root)]) == 3
    assert main(["status", "nope", "--root", str(root)]) == 2


def test_sigterm_to_the_runner_ends_the_tree(root, tmp_path):
    """A runner killed politely (TERM) must not leave the trainer running unsupervised."""
    setup_lora(root)
    pids_file = tmp_path / "pids.json"
    env = stand_in_env(tmp_path, FG_MODE="spawn", FG_PIDS=pids_file)
    runner = subprocess.Popen([sys.executable, "-m", "fluxgym", "train", "my-lora", "--root", str(root),
                               "--grace", "1", "--quiet"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pids = _wait_for(pids_file)
    runner.terminate()
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1, out.decode()
    assert _gone(pids["trainer"]) and _gone(pids["grandchild"])


def test_exit_descriptions():
    from fluxgym.supervise.process import describe_exit

    assert "hang guard" in describe_exit(124)
    assert describe_exit(-9) == "killed by signal SIGKILL"
    assert describe_exit(1) == "exit code 1"


def test_train_supervision_flags(root, tmp_path, monkeypatch, capsys):
    """--no-auto-resume and --max-restarts reach the supervisor; a bad deadline is refused before a launch."""
    from fluxgym.supervise import read_events

    paths, _ = setup_lora(root)
    for k, v in stand_in_env(tmp_path, FG_MODE="fail").items():
        monkeypatch.setenv(k, v)

    def launches() -> int:
        events, _ = read_events(paths.out("events.jsonl"))
        return sum(e["event"] == "started" and e["run"] == events[-1]["run"] for e in events)

    assert main(["train", "my-lora", "--root", str(root), "--quiet", "--no-auto-resume"]) == 1
    assert launches() == 1
    assert main(["train", "my-lora", "--root", str(root), "--quiet", "--max-restarts", "1"]) == 1
    assert launches() == 2
    assert "python -m fluxgym resume my-lora" in capsys.readouterr().err  # a crash: resuming can help
    before = paths.out("events.jsonl").stat().st_size
    assert main(["train", "my-lora", "--root", str(root), "--stuck-threshold", "0"]) == 2
    assert "--stuck-threshold 0: must be more than 0 seconds" in capsys.readouterr().err
    assert paths.out("events.jsonl").stat().st_size == before


def test_status_of_a_run_fluxgym_did_not_start(root, capsys):
    """`bash outputs/x/train.sh` writes no events: status read "not started" (or the previous supervised run's
    "succeeded") next to "phase: training", whether the trainer was alive or killed. The folder lock tells the
    first; for a folder only train.sh trained in, the heartbeat tells the second."""
    from fluxgym._paths import use_sd_scripts
    use_sd_scripts()
    from library.output_lock import acquire_output_lock

    paths, _ = setup_lora(root)
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    old = time.time() - 600
    paths.out("events.jsonl").write_text(json.dumps({"time": old, "event": "done", "run": "r1", "job": None,
                                                     "message": "done"}) + "\n")
    beat = {"phase": "training", "step": 40, "total_steps": 80, "pid": 1, "time": time.time()}
    paths.out("heartbeat.json").write_text(json.dumps(beat))
    lock = acquire_output_lock(paths.output_dir, command=["bash", "train.sh"])
    try:
        st = run_status(paths)
        assert st["state"] == "running (not under fluxgym's supervisor)" and st["pid"] == os.getpid()
        assert main(["stop", "my-lora", "--root", str(root)]) == 3  # not ours to stop: say whose it is
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    finally:
        lock.release()
    paths.out("heartbeat.json").write_text(json.dumps({**beat, "phase": "stopped", "time": time.time()}))
    assert run_status(paths)["state"] == "stopped"  # Ctrl-C of train.sh after an earlier supervised run
    paths.out("heartbeat.json").write_text(json.dumps({**beat, "phase": "stopped", "time": old - 1}))
    assert run_status(paths)["state"] == "succeeded"  # the supervised run's verdict is the newer word
    paths.out("heartbeat.json").write_text(json.dumps(beat))
    paths.out("events.jsonl").unlink()  # a folder only train.sh ever trained in
    st = run_status(paths)  # killed with -9: the lock is gone, the heartbeat still says training
    assert st["state"] == "ended (no trainer holds the folder; its heartbeat last said training)", st["state"]
    paths.out("heartbeat.json").write_text(json.dumps({**beat, "phase": "stopped", "time": time.time()}))
    assert run_status(paths)["state"] == "stopped"
