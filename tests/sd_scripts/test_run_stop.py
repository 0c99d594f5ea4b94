"""library.run_stop in small stdlib-only processes: a signal stops at the next safe point (130/143, heartbeat
`stopped` naming it), a process with no safe point is ended by the backstop, a second signal ends it at once,
a trainer below a launcher stops when the launcher dies (death signal, and the watch thread alone), a trainer
below a plain shell does not, and a forked worker keeps default signal handling.
The real trainer under each launcher is covered by test_stop_signals.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from library.heartbeat import read_heartbeat
from library.run_stop import looks_like_launcher
from train_helpers import REPO

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")

SD = str(REPO / "sd-scripts")
# argv: out mode grace [no-pdeathsig]
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {sd!r})
    from library import run_stop
    from library.heartbeat import Heartbeat
    out, mode, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if "no-pdeathsig" in sys.argv:
        run_stop._set_parent_death_signal = lambda sig: False  # only the watch thread notices the launcher
    stop = run_stop.install(out, grace=grace)
    hb = Heartbeat(out)
    hb.phase("training")
    stop.attach_heartbeat(hb)
    if mode == "fork":
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        print("forked", pid, flush=True)
        print("status", os.waitpid(pid, 0)[1], flush=True)
        sys.exit(0)
    print("ready", os.getpid(), flush=True)
    try:
        if mode == "loop":  # a safe point every 50 ms, like steps
            while True:
                time.sleep(0.05)
                run_stop.check()
        elif mode == "stuck":  # Python code that never reaches a safe point (loading, caching)
            while True:
                time.sleep(0.05)
        elif mode == "in_c":  # stuck in C with the signals blocked here: the Python handler can never run
            import ctypes
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT, signal.SIGTERM}})
            ctypes.CDLL(None).pause()
    except run_stop.RunStopped as exc:
        hb.stopped(exc.signal_name, exc.detail)
        print("clean stop", flush=True)
        run_stop.exit_process(exc.exit_code)
    """
)
# A stand-in launcher: the file is named like a launcher, starts the child and waits (argv: child args...).
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, *sys.argv[1:]])
    time.sleep(300)
    """
)


@pytest.fixture
def child_script(tmp_path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD.format(sd=SD), encoding="utf-8")
    return path


def start(cmd: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line[1])


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_gone(pid: int, bound: float) -> float:
    t0 = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - t0 < bound, f"pid {pid} still running after {bound} s"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_at_next_safe_point(tmp_path, child_script, sig, code):
    out = tmp_path / "out"
    proc, pid = start([sys.executable, str(child_script), str(out), "loop", "5"])
    t0 = time.monotonic()
    os.kill(pid, sig)
    assert proc.wait(timeout=10) == code
    assert time.monotonic() - t0 < 2.0
    stdout, stderr = proc.communicate()
    assert "clean stop" in stdout
    hb = read_heartbeat(out)
    assert hb["phase"] == "stopped" and hb["signal"] == sig.name and hb["message"].startswith(sig.name)


@pytest.mark.parametrize("mode", ["stuck", "in_c"])
def test_backstop_ends_a_process_without_safe_points(tmp_path, child_script, mode):
    out = tmp_path / "out"
    proc, pid = start([sys.executable, str(child_script), str(out), mode, "1"])
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=15) == 143
    assert 0.9 < time.monotonic() - t0 < 4.0
    stdout, stderr = proc.communicate()
    assert "clean stop" not in stdout and "no safe point within 1 s" in stderr
    hb = read_heartbeat(out)
    assert hb["phase"] == "stopped" and hb["signal"] == "SIGTERM"


def test_second_signal_ends_at_once(tmp_path, child_script):
    out = tmp_path / "out"
    proc, pid = start([sys.executable, str(child_script), str(out), "stuck", "60"])
    os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first one waits for a safe point
    t0 = time.monotonic()
    os.kill(pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.monotonic() - t0 < 2.0
    assert "a second signal" in proc.communicate()[1]
    assert read_heartbeat(out)["phase"] == "stopped"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")
@pytest.mark.parametrize("variant", ["pdeathsig", "watch-thread"])
def test_trainer_below_a_killed_launcher_stops(tmp_path, child_script, variant):
    launcher = tmp_path / "torchrun"  # what a launcher looks like on its command line
    launcher.write_text(LAUNCHER, encoding="utf-8")
    out = tmp_path / "out"
    extra = ["no-pdeathsig"] if variant == "watch-thread" else []
    proc, child = start([sys.executable, str(launcher), str(child_script), str(out), "loop", "5", *extra])
    os.kill(proc.pid, signal.SIGKILL)  # not reaped until the child is gone: its exit status stays readable
    elapsed = wait_gone(child, 10)
    assert elapsed < (0.5 if variant == "pdeathsig" else 2.5), elapsed
    hb = read_heartbeat(out)
    assert hb["phase"] == "stopped", hb
    assert f"the launcher (pid {proc.pid}) ended" in hb["message"]
    if variant == "pdeathsig":
        assert hb["signal"] == "SIGKILL" and "(SIGKILL)" in hb["message"]
    proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_trainer_below_a_plain_parent_trains_on(tmp_path, child_script):
    """`nohup python flux_train_network.py ... &` must survive its shell: only launchers are watched."""
    parent = tmp_path / "plain_parent.py"
    parent.write_text(LAUNCHER, encoding="utf-8")
    out = tmp_path / "out"
    proc, child = start([sys.executable, str(parent), str(child_script), str(out), "loop", "5"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2.0)
    assert not gone(child) and read_heartbeat(out)["phase"] == "training"
    os.kill(child, signal.SIGTERM)
    wait_gone(child, 5)
    assert read_heartbeat(out)["phase"] == "stopped"


def test_forked_worker_keeps_default_signal_handling(tmp_path, child_script):
    proc = subprocess.Popen([sys.executable, str(child_script), str(tmp_path / "out"), "fork", "5"],
                            stdout=subprocess.PIPE, text=True)
    forked = int(proc.stdout.readline().split()[1])
    time.sleep(0.2)
    os.kill(forked, signal.SIGTERM)
    status = int(proc.stdout.readline().split()[1])
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("cmdline,expected", [
    (["/usr/bin/python3", "-m", "accelerate.commands.launch", "--num_processes", "1", "train.py"], True),
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "train.py"], True),
    (["/venv/bin/torchrun", "--nproc_per_node", "2", "train.py"], True),
    (["python", "-m", "torch.distributed.run", "train.py"], True),
    (["bash", "outputs/accelerate-style/train.sh"], False),  # a LoRA named like a launcher is no launcher
    (["python", "-m", "fluxgym", "train", "accelerate"], False),
    (["-bash"], False),
])
def test_launcher_recognised_by_its_command_line(cmdline, expected):
    assert looks_like_launcher(cmdline) is expected
