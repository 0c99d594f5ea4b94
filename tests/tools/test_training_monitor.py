"""tools/training_monitor.py against a stand-in trainer (tests/tools/fake_trainer.py), plus one real-trainer run.

Every hang type must be detected within its deadline + 5 s, healthy slow phases must never be killed,
a kill must leave no process behind (grandchildren included, checked by pid), restarts must carry the
right --resume and stop at the cap or when they make no progress, and an output flood must not block.
"""

from __future__ import annotations

import importlib.util
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

from tools import training_monitor as tm

FAKE = Path(__file__).with_name("fake_trainer.py")
REPO = Path(__file__).resolve().parents[2]
FAST = ["--json", "--check-interval", "0.2", "--kill-grace", "1", "--dump-wait", "3"]
SLACK = 5.0  # detection must happen within deadline + this


def run_monitor(capsys, out: Path, fake_args: list[str], mon_args: list[str] = (), echo=None):
    argv = ["--output-dir", str(out), *FAST, *mon_args, "--", sys.executable, str(FAKE), "--output-dir", str(out),
            *fake_args]
    t0 = time.monotonic()
    rc = tm.main(argv, echo=echo)
    elapsed = time.monotonic() - t0
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return rc, events, elapsed


def of(events, kind):
    return [e for e in events if e["event"] == kind]


def launches(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "fake-launches.jsonl").read_text().splitlines()]


def fault_time(out: Path) -> float:
    return float((out / "fake-fault-at.txt").read_text().splitlines()[0].split()[2])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_all_gone(pids):
    left = [p for p in pids if not gone(p)]
    for p in left:  # never leak into other tests, but still fail
        psutil.Process(p).kill()
    assert not left, f"processes left running after the monitor ended the tree: {left}"


# ------------------------------------------------------------------------------------------ units


def test_with_resume_replaces_every_earlier_form():
    cmd = ["python", "train.py", "--resume", "old", "--lr", "1", "--resume=older"]
    assert tm.with_resume(cmd, "/o/new-state") == ["python", "train.py", "--lr", "1", "--resume", "/o/new-state"]
    assert tm.with_resume(cmd, None) == cmd  # nothing valid: keep what the user gave


def test_command_from_script_never_edits_the_script(tmp_path):
    fwd = tmp_path / "fwd.sh"
    fwd.write_text('#!/bin/bash\naccelerate launch sd-scripts/flux_train_network.py "$@"\n')
    assert tm.command_from_script(fwd) == ["bash", str(fwd)]
    gym = tmp_path / "train.sh"
    text = "cd /x\naccelerate launch \\\n  --mixed_precision bf16 \\\n  sd-scripts/flux_train_network.py \\\n" \
           "  --output_name 'my lora' \\\n  --save_state\n"
    gym.write_text(text)
    assert tm.command_from_script(gym) == [
        "accelerate", "launch", "--mixed_precision", "bf16", "sd-scripts/flux_train_network.py",
        "--output_name", "my lora", "--save_state"]
    assert gym.read_text() == text


@pytest.mark.parametrize("argv", [
    ["--output-dir", "x", "--"],
    ["--output-dir", "x", "--check-interval", "0", "--", "true"],
    ["--output-dir", "x", "--auto-resume"],  # attach + auto-resume needs --train-script
    ["--bogus", "--", "true"],
])
def test_usage_errors_exit_2(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tm.main(argv) == 2


def test_step_deadline_follows_p99_of_step_times():
    d = tm.Deadlines(stuck_threshold=2.0, first_step=7.0)
    assert d.for_phase("training", [], warm=False) == 7.0  # the first step of a launch (compile, warm-up)
    assert d.for_phase("training", [0.5]) == 2.0  # too few step times: the floor
    assert d.for_phase("training", [0.1] * 50) == 2.0  # floor
    assert d.for_phase("training", [1.0] * 98 + [3.0] * 2) == pytest.approx(15.0)  # 5 x p99
    assert d.for_phase("caching_text", []) == d.caching and d.for_phase("saving", []) == d.saving


def test_log_parser_reads_upstream_markers_across_chunks_and_carriage_returns():
    from fluxgym.supervise.progress import LogParser

    p = LogParser()
    p.feed(b"caching latents...\n 50%|#####     | 1/2 [00:01<00:01]\r")
    assert p.state.phase == "caching_latents"
    p.feed(b"steps:   0%|          | 0/40 [00:00<?, ?it/s]\rsteps:   2%|          | 1/4")  # bar cut mid-chunk
    p.feed(b"0 [00:01<00:39,  1.00s/it, avr_loss=0.3]\r")
    assert (p.state.phase, p.state.step, p.state.total) == ("training", 1, 40)
    changes = p.state.changes
    p.feed(b"steps:   2%|          | 1/40 [00:02<00:39,  1.00s/it, avr_loss=0.2]\r")  # redraw, no new step
    assert p.state.changes == changes
    p.feed(b"\rsteps:   5%|          | 2/40 [00:03<00:38,  1.00s/it]")  # tqdm leaves the newest bar open
    assert p.state.step == 2
    p.feed(b"\rsteps:   7%|          | 3/4")  # counter not complete yet: not read
    assert p.state.step == 2
    p.feed(b"0 [00:04<00:37,  1.00s/it]\n")
    assert p.state.step == 3 and [s for s, _ in p.step_events] == [0, 1, 2, 3]
    p.feed(b"\nepoch 2/4\nsaving checkpoint: /o/x-000001.safetensors\n")
    assert (p.state.epoch, p.state.total_epochs, p.state.phase) == (2, 4, "saving")
    p.feed(b"x" * 100_000)  # no line end: memory stays bounded, nothing misparsed
    assert p.state.phase == "saving" and [s for s, _ in p.step_events] == [0, 1, 2, 3]


def test_monitor_imports_no_training_stack():
    code = ("import sys; sys.argv = ['x']; import runpy; "
            f"runpy.run_path({str(REPO / 'tools' / 'training_monitor.py')!r}, run_name='not_main'); "
            "import library.checkpoint_validation; "
            "print(sorted(m for m in ('torch', 'numpy', 'diffusers', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


# ------------------------------------------------------------------------------------------ runs


def test_healthy_run_exits_zero_and_logs_everything(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(capsys, out, ["--steps", "8", "--step-time", "0.02", "--save-every", "4"],
                                ["--stuck-threshold", "5"])
    assert rc == 0 and of(events, "finished") and not of(events, "stall")
    log = (out / "train.log").read_text()
    assert "model saved." in log and "8/8" in log and "epoch 2/2" in log
    assert (out / "fake.safetensors").is_file()
    assert "training finished" in (out / "training_monitor.log").read_text()


@pytest.mark.parametrize("fault,extra,deadline_flag,phase", [
    ("hang", ["--fault-at", "6"], "--stuck-threshold", "training"),
    ("sigstop", ["--fault-at", "6", "--no-heartbeat"], "--stuck-threshold", "training"),
    ("silent-caching", [], "--caching-timeout", "caching_latents"),
    ("silent-saving", ["--save-every", "4"], "--save-timeout", "saving"),
])
def test_every_hang_type_is_detected_within_deadline(tmp_path, capsys, fault, extra, deadline_flag, phase):
    out = tmp_path / "run"
    deadline = 2.0
    rc, events, _ = run_monitor(
        capsys, out, ["--steps", "30", "--step-time", "0.03", "--fault", fault, *extra],
        [deadline_flag, str(deadline), "--first-step-timeout", "2", "--stuck-threshold", "2"])
    assert rc == tm.EXIT_STALLED
    stall = of(events, "stall")
    assert len(stall) == 1 and stall[0]["phase"] == phase
    latency = stall[0]["time"] - fault_time(out)
    assert latency <= deadline + SLACK, f"{fault}: detected after {latency:.1f} s"
    report = Path(of(events, "report")[0]["path"]).read_text()
    assert f"phase: {phase}" in report and "## Process tree" in report and "loading model (fake)" in report
    if fault == "hang":  # our trainer answers SIGUSR1 with its stacks
        assert "_hang_forever" in report
    if fault == "sigstop":
        assert "steps:  16%" in report  # the last bar the user saw (log-only run)
    assert_all_gone([launches(out)[0]["pid"]])


def test_slow_but_alive_and_long_phases_are_not_killed(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(
        capsys, out,
        ["--steps", "24", "--step-time", "0.02", "--save-every", "8", "--caching-time", "1.2", "--saving-time", "1.0",
         "--fault", "crawl", "--fault-at", "11", "--crawl-factor", "40", "--crawl-steps", "3"],
        ["--caching-timeout", "3", "--save-timeout", "3", "--stuck-threshold", "3", "--first-step-timeout", "3"])
    assert rc == 0 and not of(events, "stall")
    crawl = of(events, "crawl")
    assert len(crawl) == 1 and crawl[0]["step"] >= 13  # reported as a warning, once


def test_kill_ends_grandchildren_even_outside_the_group(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(capsys, out, ["--steps", "30", "--fault", "hang", "--fault-at", "3",
                                              "--spawn-children"],
                                ["--stuck-threshold", "1.5", "--first-step-timeout", "1.5"])
    assert rc == tm.EXIT_STALLED
    kids = json.loads((out / "fake-children.json").read_text())
    assert len(of(events, "killing")[0]["pids"]) == 4 and of(events, "killed")
    assert_all_gone([launches(out)[0]["pid"], *kids])  # one ignores SIGTERM, one called setsid


def test_auto_resume_relaunches_with_the_newest_valid_state(tmp_path, capsys):
    out = tmp_path / "run"
    sys.path.insert(0, str(FAKE.parent))
    import fake_trainer

    old = fake_trainer.save_state(out, "fake", 2, 1)
    rc, events, _ = run_monitor(
        capsys, out,
        ["--steps", "10", "--step-time", "0.03", "--save-every", "2", "--fault", "hang", "--fault-at", "7",
         "--resume", str(old)],
        ["--auto-resume", "--stuck-threshold", "1.5", "--first-step-timeout", "1.5"])
    assert rc == 0, events
    runs = launches(out)
    assert [r["start_step"] for r in runs] == [2, 6]
    argv = runs[1]["argv"]
    assert argv.count("--resume") == 1 and argv[-2:] == ["--resume", str(out / "fake-step00000006-state")]
    assert of(events, "restart")[0]["resume_step"] == 6
    assert (out / "fake.safetensors").is_file()


def test_restart_cap_stops_a_run_that_keeps_crashing(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(
        capsys, out, ["--steps", "50", "--step-time", "0.01", "--save-every", "1", "--fault", "crash",
                      "--fault-after", "2", "--fault-times", "99"],
        ["--auto-resume", "--max-restarts", "2"])
    assert rc == tm.EXIT_GAVE_UP
    assert [r["start_step"] for r in launches(out)] == [0, 2, 4]  # each launch progressed, so only the cap stops
    assert "restart cap" in of(events, "gave_up")[0]["message"]


def test_no_progress_guard_stops_after_two_fruitless_restarts(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(
        capsys, out, ["--steps", "20", "--step-time", "0.01", "--save-every", "2", "--fault", "crash",
                      "--fault-at", "5", "--fault-times", "99"],
        ["--auto-resume", "--max-restarts", "5"])
    assert rc == tm.EXIT_GAVE_UP
    assert [r["start_step"] for r in launches(out)] == [0, 4, 4]
    assert "did not get past step 4" in of(events, "gave_up")[0]["message"]


def test_crash_without_auto_resume_returns_the_trainers_code(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(capsys, out, ["--fault", "crash", "--fault-at", "2", "--crash-code", "7"])
    assert rc == 7 and of(events, "exited")[0]["rc"] == 7


def test_finished_run_that_never_exits_is_ended_not_restarted(tmp_path, capsys):
    out = tmp_path / "run"
    rc, events, _ = run_monitor(capsys, out, ["--steps", "4", "--step-time", "0.01", "--fault", "linger"],
                                ["--auto-resume", "--save-timeout", "1.5"])
    assert rc == 0 and len(launches(out)) == 1
    assert of(events, "stall")[0]["phase"] == "done" and of(events, "finished_unclean")
    assert_all_gone([launches(out)[0]["pid"]])


def test_a_command_that_cannot_start_is_not_retried(tmp_path, capsys):
    out = tmp_path / "run"
    rc = tm.main(["--output-dir", str(out), *FAST, "--auto-resume", "--", str(tmp_path / "no-such-trainer")])
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert rc == 127 and of(events, "launch_failed") and not of(events, "restart")


def test_stopping_the_monitor_ends_the_training_tree(tmp_path):
    out = tmp_path / "run"
    mon = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "training_monitor.py"), "--output-dir", str(out), "--check-interval",
         "0.2", "--kill-grace", "1", "--", sys.executable, str(FAKE), "--output-dir", str(out), "--steps", "400",
         "--step-time", "0.05", "--spawn-children"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and not (out / "fake-children.json").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        mon.terminate()
        stdout, stderr = mon.communicate(timeout=20)
    finally:
        if mon.poll() is None:
            mon.kill()
    assert mon.returncode == tm.EXIT_INTERRUPTED, stderr.decode()[-2000:]
    assert b"steps:" in stdout  # the trainer's output is echoed to the console without --json
    assert_all_gone([launches(out)[0]["pid"], *json.loads((out / "fake-children.json").read_text())])


class _StalledConsole:
    """A console that never accepts a byte (a frozen UI or a paused terminal)."""

    def __init__(self):
        self.release = threading.Event()

    def write(self, data):
        self.release.wait()
        return len(data)

    def flush(self):
        pass


def test_output_flood_never_blocks_the_trainer(tmp_path, capsys):
    out = tmp_path / "run"
    console = _StalledConsole()
    try:
        rc, events, elapsed = run_monitor(
            capsys, out, ["--steps", "3", "--step-time", "0.01", "--fault", "flood", "--fault-at", "2",
                          "--flood-mb", "50"], ["--stuck-threshold", "20"], echo=console)
    finally:
        console.release.set()
    assert rc == 0 and not of(events, "stall")
    assert float((out / "fake-flood.txt").read_text()) < 20.0  # 50 MB written without waiting on the console
    assert elapsed < 30.0
    assert (out / "train.log").stat().st_size > 50 * 1024 * 1024


def test_attach_mode_uses_the_heartbeat_pid(tmp_path, capsys):
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, str(FAKE), "--output-dir", str(out), "--steps", "30", "--fault", "hang", "--fault-at", "4",
         "--spawn-children"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end and not (out / "fake-fault-at.txt").exists():
            time.sleep(0.05)
        rc = tm.main(["--output-dir", str(out), *FAST, "--stuck-threshold", "1.5"])  # already past step 1
        events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
        assert rc == tm.EXIT_STALLED
        assert of(events, "attached")[0]["pid"] == child.pid
        child.wait(5)
        assert_all_gone([child.pid, *json.loads((out / "fake-children.json").read_text())])
    finally:
        if child.poll() is None:
            child.kill()


def test_attach_mode_restarts_through_the_train_script(tmp_path, capsys):
    out = tmp_path / "run"
    script = tmp_path / "train.sh"
    text = (f'#!/bin/bash\nexec {sys.executable} {FAKE} --output-dir {out} --steps 10 --step-time 0.03 '
            f'--save-every 2 --fault hang --fault-at 5 "$@"\n')
    script.write_text(text)
    child = subprocess.Popen(["bash", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end and not (out / "fake-fault-at.txt").exists():
            time.sleep(0.05)
        rc = tm.main(["--output-dir", str(out), *FAST, "--stuck-threshold", "1.5", "--auto-resume",
                      "--train-script", str(script)])
        events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
        assert rc == 0, [e["message"] for e in events]
        runs = launches(out)
        assert [r["start_step"] for r in runs] == [0, 4]
        assert runs[1]["argv"][-2:] == ["--resume", str(out / "fake-step00000004-state")]
        assert script.read_text() == text  # restarts never edit the user's script
        child.wait(5)
    finally:
        if child.poll() is None:
            child.kill()


def test_attach_refuses_a_pid_that_is_not_the_heartbeats_trainer(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        beat = {"version": 1, "pid": newer.pid, "phase": "training", "step": 3, "time": time.time() - 60}
        (out / "heartbeat.json").write_text(json.dumps(beat))  # written before that process existed
        assert tm.main(["--output-dir", str(out), *FAST]) == 2
        (out / "heartbeat.json").write_text(json.dumps({**beat, "time": time.time(), "phase": "done"}))
        assert tm.main(["--output-dir", str(out), *FAST]) == 2
        assert newer.poll() is None  # never touched
    finally:
        newer.kill()
        newer.wait()


# ------------------------------------------------------------------------------------------ real trainer


def _train_helpers():
    path = REPO / "tests" / "sd_scripts" / "train_helpers.py"
    if not (REPO / "sd-scripts" / "flux_train_network.py").is_file() or not path.is_file():
        pytest.skip("sd-scripts/flux_train_network.py or tests/sd_scripts/train_helpers.py is missing "
                    "(the real trainer is not in this checkout)")
    spec = importlib.util.spec_from_file_location("monitor_train_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stop_once_past_a_checkpoint(out: Path, stopped: dict, done: threading.Event) -> None:
    """SIGSTOP the real trainer once it has a saved state and has trained past it (like a frozen GPU driver)."""
    while not done.is_set():
        try:
            hb = json.loads((out / "heartbeat.json").read_text())
        except (OSError, ValueError):
            hb = {}
        if hb.get("phase") == "training" and hb.get("last_checkpoint") and hb.get("step", 0) >= 3:
            os.kill(hb["pid"], signal.SIGSTOP)
            stopped.update(pid=hb["pid"], step=hb["step"])
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_real_trainer_sigstop_is_killed_and_resumed_to_the_final_lora(tmp_path, capsys, tiny_models):
    helpers = _train_helpers()
    _, toml = helpers.make_dataset(tmp_path / "data", count=2, size=64)
    out = tmp_path / "out"
    args = helpers.trainer_args(tiny_models, toml, out, "--max_train_steps", "8", "--save_every_n_steps", "2",
                                "--save_state")
    stopped, done = {}, threading.Event()
    watcher = threading.Thread(target=_stop_once_past_a_checkpoint, args=(out, stopped, done), daemon=True)
    watcher.start()
    try:
        rc = tm.main(["--output-dir", str(out), *FAST, "--auto-resume", "--stuck-threshold", "8",
                      "--output-name", "tiny", "--",
                      sys.executable, str(helpers.SCRIPT), *args])
    finally:
        done.set()
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert stopped, "the trainer never reached a saved state in training"
    assert rc == 0, [e["message"] for e in events]
    assert len(of(events, "stall")) == 1 and gone(stopped["pid"])
    restart = of(events, "restart")[0]
    assert restart["argv"][-2] == "--resume" and "tiny-step" in restart["argv"][-1]
    assert 2 <= restart["resume_step"] <= stopped["step"]
    from library.checkpoint_validation import validate_lora_file

    assert validate_lora_file(out / "tiny.safetensors").valid
