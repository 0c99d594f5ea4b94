"""Black-box hang tests: each guarded site, stalled on purpose, ends the run fast and says where.

FLUXTRAIN_INJECT_HANG=<site> makes that site block forever. For every bounded site the real
entry script must exit non-zero within its timeout + 15 s, print `HANG GUARD [<site>]`, leave
a hang-*.txt stack dump and a heartbeat that names the phase. `step` cannot be interrupted
from inside (like a stuck GPU kernel): the stack dump must still appear in time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from train_helpers import REPO, SCRIPT, make_dataset, run_trainer, trainer_args

TIMEOUT = 3
STARTUP_ALLOWANCE = 40  # process start, imports, tiny model load and caching on a loaded 2-core machine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hangs")
    _, toml = make_dataset(root, count=2, size=64)
    prompts = root / "prompts.txt"
    prompts.write_text("tok, a red ball --w 32 --h 32 --s 2 --d 1\n", encoding="utf-8")
    return root, toml, prompts


CASES = {
    "dataloader": (["--max_data_loader_n_workers", "1", "--dataloader_timeout", str(TIMEOUT)], "training"),
    # The first swap happens while the network is set up (phase loading), before any step.
    "block_swap": (["--blocks_to_swap", "1", "--block_swap_timeout", str(TIMEOUT)], "loading"),
    "cache_io": (["--cache_io_timeout", str(TIMEOUT), "--max_data_loader_n_workers", "0"], None),
    "sample": (["--sample_at_first", "--sample_timeout", str(TIMEOUT)], "sampling"),
    "save": (["--save_every_n_steps", "1", "--save_state", "--save_timeout", str(TIMEOUT)], "saving"),
}


@pytest.mark.parametrize("site", sorted(CASES))
def test_guarded_site_fails_fast_with_diagnosis(site, data, tiny_models, tmp_path):
    root, toml, prompts = data
    extra, phase = CASES[site]
    out = tmp_path / "out"
    args = trainer_args(tiny_models, toml, out, "--max_train_steps", "3", "--sample_prompts", str(prompts),
                        *extra)
    started = time.monotonic()
    proc = run_trainer(args, env={"FLUXTRAIN_INJECT_HANG": site}, timeout=STARTUP_ALLOWANCE + TIMEOUT + 60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"HANG GUARD [{site}]" in proc.stderr
    assert elapsed < STARTUP_ALLOWANCE + TIMEOUT + 15
    dumps = list(out.glob("hang-*.txt"))
    assert dumps and "Thread" in dumps[0].read_text() or "File" in dumps[0].read_text()
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["phase"] == "failed" and f"[{site}]" in beat["message"]
    if phase:
        assert f"phase {phase}" in beat["message"]
    if site == "save":  # the interrupted save left nothing that passes for a checkpoint
        from library.checkpoint_validation import newest_valid_state

        assert newest_valid_state(out, "tiny") is None


def test_stuck_step_dumps_stacks_and_heartbeat_stops(data, tiny_models, tmp_path):
    root, toml, _ = data
    out = tmp_path / "out"
    args = trainer_args(tiny_models, toml, out, "--max_train_steps", "3", "--stall_dump_timeout", str(TIMEOUT))
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
    env = dict(os.environ, FLUXTRAIN_INJECT_HANG="step", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([python, str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        beat_file, training_since = out / "heartbeat.json", None
        deadline = time.monotonic() + 120  # start-up on a busy 2-core machine; not what is measured
        while training_since is None and time.monotonic() < deadline and proc.poll() is None:
            if beat_file.exists() and json.loads(beat_file.read_text() or "{}").get("phase") == "training":
                training_since = time.monotonic()
            time.sleep(0.2)
        assert training_since is not None, "the run never reached the training phase"
        dump = None
        # The bound under test: the stuck step's stack dump within --stall_dump_timeout + 15 s.
        while dump is None and time.monotonic() < training_since + TIMEOUT + 15:
            # A slow start may already have produced a dump of the loading phase; look for the step's.
            dumps = [p for p in out.glob("hang-*.txt") if "inject_point" in p.read_text()]
            dump = dumps[0] if dumps else None
            time.sleep(0.2)
        listing = {p.name: p.read_text()[:300] for p in out.glob("*hang*")}
        listing.update({p.name: p.stat().st_size for p in out.glob(".*")})
        assert dump is not None, f"no stack dump of the stuck step within the stall timeout: {listing}"
        assert "training_step" in dump.read_text()
        before = json.loads((out / "heartbeat.json").read_text())
        time.sleep(2)
        after = json.loads((out / "heartbeat.json").read_text())
        assert after["step"] == before["step"] == 0 and after["time"] == before["time"]
        assert proc.poll() is None  # diagnosis only: ending the process is the monitor's job
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
