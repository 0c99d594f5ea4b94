"""The real trainer on the tiny demo model: each signal (TERM, INT) to each process of a run ends every process
within the bound, marks the heartbeat `stopped` with the signal and leaves every completed checkpoint valid; and
a second entry into a folder in use (`bash train.sh` / `python -m fluxgym train`, either order) exits 4 at once.

`train.sh` execs accelerate's launcher, so the train.sh process *is* the launcher (asserted below): a signal to
train.sh is a signal to `accelerate launch`. The cases run concurrently (one trainer each) to keep the module
short; the 2-process case (kill -9 of torch's launcher group) runs on its own and is marked slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fluxgym.demo import build_demo
from fluxgym.generate import REPO_ROOT
from fluxgym.naming import project_paths

pytestmark = [
    pytest.mark.skipif(os.name == "nt" or not sys.platform.startswith("linux"), reason="POSIX signals, /proc"),
    pytest.mark.skipif(not (REPO_ROOT / ".venv" / "bin" / "python").exists(), reason="needs the project .venv"),
]

PY = str(REPO_ROOT / ".venv" / "bin" / "python")
SCRIPT = REPO_ROOT / "sd-scripts" / "flux_train_network.py"
STOP_BOUND_S = 15.0  # 5 s backstop + the launcher's own exit + a loaded 2-core machine
PHASE_TIMEOUT_S = 240.0
# Mid-training for long enough, with a state folder every 2 steps so completed checkpoints exist when signalled.
LONG_RUN = ["--max_train_epochs", "60", "--save_every_n_steps", "2"]


@dataclass
class Case:
    name: str
    sig: signal.Signals
    target: str  # "launcher" (train.sh / accelerate launch) or "trainer"
    phase: str  # heartbeat phase at which the signal is sent ("training" waits for a first checkpoint too)
    entry: str  # "train.sh", "accelerate", "fluxgym", "ddp"
    expect_signal: str = ""
    result: dict = field(default_factory=dict)


CASES = [
    Case("TERM-train.sh", signal.SIGTERM, "launcher", "training", "train.sh", "SIGTERM"),
    Case("INT-accelerate", signal.SIGINT, "launcher", "caching_latents", "accelerate", "SIGINT"),
    Case("TERM-trainer", signal.SIGTERM, "trainer", "loading", "train.sh", "SIGTERM"),
    Case("INT-trainer", signal.SIGINT, "trainer", "training", "fluxgym", "SIGINT"),
    # torch's launcher starts each worker in its own session: kill -9 of the launcher's group misses them.
    Case("KILL-ddp-launcher-group", signal.SIGKILL, "group", "training", "ddp", "SIGKILL"),
]
POOL = [c for c in CASES if c.entry != "ddp"]  # the 2-process case is slow (3 processes) and runs on its own


def _status(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _alive(pid: int) -> bool:
    return _status(pid) not in (None, "Z", "X")


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _trainers(leader: int) -> list[int]:
    """Processes of the run that run the trainer script (not the launcher, not bash)."""
    out = []
    for pid in _descendants(leader) + [leader]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flux_train_network.py") for a in cmd[:4]) and not any(b"accelerate" in a for a in cmd[:3]):
            out.append(pid)
    return out


ORDER = ("loading", "caching_latents", "caching_text", "training")


def _wait_phase(out: Path, phase: str, proc: subprocess.Popen) -> dict:
    """Wait until the heartbeat is at `phase` or a later one (phases can be shorter than a poll)."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            beat = json.loads((out / "heartbeat.json").read_text())
            now = ORDER.index(beat["phase"]) if beat["phase"] in ORDER else -1
            if now >= ORDER.index(phase) and (phase != "training" or beat.get("last_checkpoint")):
                return beat
        except (OSError, ValueError, KeyError):
            pass
        assert _alive(proc.pid), f"the run ended before phase {phase}"
        time.sleep(0.05)
    raise AssertionError(f"phase {phase} not reached in {PHASE_TIMEOUT_S} s")


def _probe(cmd: list[str], cwd: Path) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return {"rc": proc.returncode, "out": proc.stdout + proc.stderr, "elapsed": time.monotonic() - t0}


def _run_case(case: Case, root: Path, models: dict, toml: Path) -> None:
    paths = project_paths(root, "demo")
    out = paths.output_dir
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if case.entry in ("accelerate", "ddp"):
        from train_helpers import trainer_args

        out = root / "out"
        args = trainer_args(models, toml, out, *LONG_RUN, "--save_state")
        multi = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"] if case.entry == "ddp" else [
            "--num_processes", "1"]
        cmd = [PY, "-m", "accelerate.commands.launch", *multi, "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", str(SCRIPT), *args]
    elif case.entry == "fluxgym":
        cmd = [PY, "-m", "fluxgym", "train", "demo", "--root", str(root), "--quiet"]
    else:
        cmd = ["bash", str(paths.out("train.sh"))]
    log = open(root / f"{case.name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                            start_new_session=True)
    r = case.result
    r["out"], r["leader"] = out, proc.pid
    try:
        _wait_phase(out, "loading", proc)
        if case.entry == "train.sh":  # holder: train.sh; a second train.sh and a supervised run must refuse
            r["probes"] = {"train.sh": _probe(["bash", str(paths.out("train.sh"))], REPO_ROOT),
                           "fluxgym": _probe([PY, "-m", "fluxgym", "train", "demo", "--root", str(root), "--quiet"],
                                             REPO_ROOT)}
        elif case.entry == "fluxgym":  # holder: fluxgym train; the reverse
            r["probes"] = {"train.sh": _probe(["bash", str(paths.out("train.sh"))], REPO_ROOT)}
        _wait_phase(out, case.phase, proc)
        trainers = _trainers(proc.pid)
        r["pids"] = [proc.pid] + _descendants(proc.pid)
        r["trainers"] = trainers
        r["leader_cmd"] = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        r["states_before"] = sorted(p.name for p in out.glob("*-state"))
        t0 = time.monotonic()
        if case.target == "group":
            os.killpg(proc.pid, case.sig)
        else:
            os.kill(proc.pid if case.target == "launcher" else trainers[0], case.sig)
        # Not reaped (no poll/wait) until the trainers are gone: the trainer reads its launcher's exit status.
        while any(_alive(p) for p in r["pids"]) and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        r["stop_s"] = time.monotonic() - t0
        r["left"] = [p for p in r["pids"] if _alive(p)]
    finally:
        for pid in [proc.pid] + _descendants(proc.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        r["rc"] = proc.wait(timeout=30)
        log.close()
        r["log"] = (root / f"{case.name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One tiny model build shared by every case; one project root (demo train.sh) per case."""
    from fluxgym.tiny_flux import build_tiny_models
    from train_helpers import make_dataset

    base = tmp_path_factory.mktemp("stop-e2e")
    first = base / "models-home"
    first.mkdir()
    models = build_tiny_models(first / "models")
    _, toml = make_dataset(base / "data", count=4, size=64)

    def project(case: Case) -> Path:
        root = base / case.name
        root.mkdir()
        (root / "models").symlink_to(first / "models")
        build_demo(root, extra=LONG_RUN)
        return root

    return project, models, toml


def _run_guarded(case: Case, setup) -> Case:
    project, models, toml = setup
    try:
        _run_case(case, project(case), models, toml)
    except BaseException as exc:  # reported by the test of that case, with its log
        case.result["error"] = exc
    return case


@pytest.fixture(scope="module")
def finished_cases(setup):
    threads = [threading.Thread(target=_run_guarded, args=(c, setup)) for c in POOL]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return {c.name: c for c in POOL}


def _find_checkpoint(out: Path) -> dict:
    proc = subprocess.run([PY, str(REPO_ROOT / "tools" / "find_checkpoint.py"), str(out), "--json"],
                          capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


@pytest.mark.parametrize("name", [c.name for c in POOL])
def test_signal_stops_every_process_of_the_run(finished_cases, name):
    check_stopped(finished_cases[name])


@pytest.mark.slow
def test_kill9_of_torch_launcher_group_stops_both_workers(setup):
    case = _run_guarded(next(c for c in CASES if c.entry == "ddp"), setup)
    check_stopped(case)
    assert len(case.result["trainers"]) == 2


def check_stopped(case: Case) -> None:
    name = case.name
    r = case.result
    if "error" in r:
        raise AssertionError(f"{name}: {r['error']}\n{r.get('log', '')[-3000:]}") from r["error"]
    assert r["trainers"], r["pids"]
    assert not r["left"], f"still running after {r['stop_s']:.1f} s: {r['left']}\n{r['log'][-2000:]}"
    assert r["stop_s"] < STOP_BOUND_S, r["stop_s"]
    beat = json.loads((r["out"] / "heartbeat.json").read_text())
    assert beat["phase"] == "stopped", (beat, r["log"][-3000:])
    assert beat["signal"] == case.expect_signal, beat
    assert beat["pid"] in r["trainers"]
    if case.target != "trainer":
        assert "the launcher (pid" in beat["message"], beat
    # Every completed checkpoint is still valid (a save cut short is a temp name, removed at the next start).
    found = _find_checkpoint(r["out"])
    candidates = [c for group in found.get("candidates", {}).values() for c in group]
    assert all(c["valid"] for c in candidates), candidates
    if case.phase == "training":
        assert r["states_before"] and any(c["kind"] == "state" for c in candidates), found
    if case.entry == "train.sh" and case.target == "launcher":
        assert b"accelerate.commands.launch" in r["leader_cmd"]  # exec: train.sh's pid is the launcher's
        assert r["rc"] == -signal.SIGTERM


@pytest.mark.parametrize("holder,probe", [("TERM-train.sh", "train.sh"), ("TERM-train.sh", "fluxgym"),
                                          ("INT-trainer", "train.sh")])
def test_second_trainer_on_the_folder_exits_4(finished_cases, holder, probe):
    r = finished_cases[holder].result
    if "error" in r:
        raise AssertionError(f"{holder}: {r['error']}") from r["error"]
    p = r["probes"][probe]
    assert p["rc"] != 0 and "is in use by another trainer (pid" in p["out"], p["out"][-3000:]
    assert f"pid {r['trainers'][0]}" in p["out"]
    if probe == "train.sh":
        assert "flux_train_network.py" in p["out"]  # the holder's command
        # The trainer exits 4; accelerate's launcher reports any non-zero code of its child as its own exit 1.
        assert "returned non-zero exit status 4" in p["out"], p["out"][-2000:]
    # Refused right after the settings: it never set up the accelerator, let alone loaded a model. (Its time
    # to exit is bounded in test_output_lock; here four trainers share the CPU.)
    assert "preparing accelerator" not in p["out"]
