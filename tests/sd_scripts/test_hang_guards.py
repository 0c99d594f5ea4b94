"""Hang guards: deadlines end the process with 124, a message, a stack dump and a failed heartbeat.

The exit path uses os._exit, so those tests run a small script in a subprocess; bookkeeping
(nesting, cancelling, overhead) is tested in-process with a replaced exit function.
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from library.hang_guards import EXIT_HANG, HangGuards, is_dataloader_timeout
from library.hang_sites import SITES
from library.heartbeat import Heartbeat, read_heartbeat

PRELUDE = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path.insert(0, {sd!r})
    from library.heartbeat import Heartbeat
    from library.hang_guards import HangGuards
    out = sys.argv[1]
    hb = Heartbeat(out)
    hb.set_totals(100, 5)
    hb.phase("training")
    hb.step(42, 3)
    where = lambda: {{"phase": "training", "epoch": 3, "step": 42}}
    g = HangGuards(out, hb, stall_dump_timeout={stall}, position=where)
    """
)


def run_script(tmp_path: Path, body: str, python: str, *, stall: float = 0, timeout: float = 60, env=None):
    out = tmp_path / "out"
    script = tmp_path / "script.py"
    sd = str(Path(__file__).resolve().parents[2] / "sd-scripts")
    script.write_text(PRELUDE.format(sd=sd, stall=stall) + textwrap.dedent(body))
    t0 = time.monotonic()
    r = subprocess.run([python, str(script), str(out)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    return r, time.monotonic() - t0, out


def assert_hang_report(r, out: Path, site: str, *frames: str):
    assert r.returncode == EXIT_HANG, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"HANG GUARD [{site}]:")]
    assert len(lines) == 1, r.stderr
    assert "(phase training, epoch 3, step 42). Try: " in lines[0]
    dumps = sorted(out.glob("hang-*.txt"))
    assert len(dumps) == 1, list(out.iterdir())
    text = dumps[0].read_text()
    assert text.startswith(lines[0]) and "Thread 0x" in text
    for frame in frames:
        assert frame in text, text
    assert dumps[0].name in r.stderr
    hb = read_heartbeat(out)
    assert hb["phase"] == "failed" and hb["message"] == lines[0] and hb["step"] == 42
    assert not list(out.glob(".*-dump-*")), "hidden dump files must be cleaned up"
    return lines[0], text


def test_deadline_fires_exit_124_with_report(tmp_path, venv_python):
    body = """
    def read_forever():
        time.sleep(60)
    with g.deadline("cache_io", 1.0, detail="reading /data/a_flux.npz"):
        read_forever()
    print("not reached")
    """
    r, elapsed, out = run_script(tmp_path, body, venv_python)
    line, text = assert_hang_report(r, out, "cache_io", "in read_forever")
    assert "reading /data/a_flux.npz within 1 s" in line and "--cache_io_timeout" in line
    assert "not reached" not in r.stdout
    assert elapsed < 1.0 + 4.0, elapsed


def test_stuck_non_daemon_thread_cannot_keep_process_alive(tmp_path, venv_python):
    body = """
    def stuck_worker():
        time.sleep(600)
    threading.Thread(target=stuck_worker, daemon=False).start()
    with g.deadline("block_swap", 1.0, detail="moving block 3 to cuda"):
        time.sleep(60)
    """
    r, elapsed, out = run_script(tmp_path, body, venv_python)
    line, _ = assert_hang_report(r, out, "block_swap", "in stuck_worker")
    assert "--block_swap_timeout" in line
    assert elapsed < 1.0 + 4.0, elapsed


def test_fire_from_dataloader_exception_uses_same_path(tmp_path, venv_python):
    body = """
    try:
        raise RuntimeError("DataLoader timed out after 300 seconds")
    except RuntimeError as e:
        g.fire_from_exception("dataloader", e)
    """
    r, _, out = run_script(tmp_path, body, venv_python)
    line, _ = assert_hang_report(r, out, "dataloader")
    assert "RuntimeError: DataLoader timed out after 300 seconds" in line


@pytest.mark.parametrize("loader_timeout,deadline,expect", [
    (1, 30, "RuntimeError: DataLoader timed out after 1 seconds"),  # torch's own timeout, main thread fires
    (0, 1, "waiting for the next batch within 1 s"),  # our deadline, the watchdog thread fires
])
def test_real_dataloader_stuck_worker_exits_124(tmp_path, venv_python, loader_timeout, deadline, expect):
    """A real DataLoader with a worker stuck forever: exit 124 in bounded time, no orphaned worker."""
    body = f"""
    import torch
    from library.fault_injection import inject_point

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            inject_point("dataloader")
            return torch.zeros(2)

    dl = torch.utils.data.DataLoader(DS(), batch_size=2, num_workers=1, timeout={loader_timeout})
    for batch in g.guard_iterator(dl, site="dataloader", seconds={deadline}):
        pass
    """
    env = dict(os.environ, FLUXTRAIN_INJECT_HANG="dataloader")
    # capture_output waits for EOF on the pipes: an orphaned worker holding them would hang this call.
    r, elapsed, out = run_script(tmp_path, body, venv_python, env=env, timeout=90)
    line, _ = assert_hang_report(r, out, "dataloader")
    assert expect in line
    assert elapsed < 30, elapsed


def test_stall_dump_when_progress_stops_and_not_before(tmp_path, venv_python):
    body = """
    g.progress()
    for _ in range(8):          # 1.6 s of steady progress with a 1 s stall timeout: no dump
        time.sleep(0.2)
        g.progress()
    print("files after progress:", sorted(p for p in os.listdir(out) if p.startswith("hang-")), flush=True)
    def stalled_step():
        time.sleep(3.0)         # no progress(): the dump must appear, the process must go on
    stalled_step()
    g.close()
    print("finished")
    """
    r, _, out = run_script(tmp_path, body, venv_python, stall=1.0)
    assert r.returncode == 0, r.stderr
    assert "files after progress: []" in r.stdout and "finished" in r.stdout
    dumps = sorted(out.glob("hang-*.txt"))
    assert len(dumps) == 1
    text = dumps[0].read_text()
    assert "in stalled_step" in text and "Thread 0x" in text
    assert "STALL: no progress for 1 s" in r.stderr and dumps[0].name in r.stderr
    assert read_heartbeat(out)["phase"] == "training"  # diagnosis only
    assert not list(out.glob(".*-dump-*"))


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform")
def test_sigusr1_dumps_stacks_on_demand(tmp_path, venv_python):
    out = tmp_path / "out"
    sd = str(Path(__file__).resolve().parents[2] / "sd-scripts")
    script = tmp_path / "script.py"
    script.write_text(PRELUDE.format(sd=sd, stall=0) + textwrap.dedent(
        """
        def waiting_for_user():
            print("ready", flush=True)
            while not os.path.exists(os.path.join(out, "stop")):
                time.sleep(0.05)
        waiting_for_user()
        g.close()
        """
    ))
    proc = subprocess.Popen([venv_python, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 8
        dumps = []
        while time.monotonic() < deadline and not dumps:
            dumps = [p for p in out.glob("stacks-*.txt") if p.stat().st_size > 0]
            time.sleep(0.1)
        assert dumps, list(out.iterdir())
        assert "in waiting_for_user" in dumps[0].read_text()
        (out / "stop").write_text("")
        assert proc.wait(timeout=20) == 0  # the signal dumps, it does not kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(list(out.glob("stacks-*.txt"))) == 1 and not list(out.glob("hang-*.txt"))


@pytest.fixture
def guards(tmp_path):
    calls: list[int] = []
    fired = threading.Event()

    def fake_exit(code):
        calls.append(code)  # returning makes fire() raise SystemExit, which ends the watchdog thread quietly
        fired.set()

    hb = Heartbeat(tmp_path)
    hb.phase("training")
    g = HangGuards(tmp_path, hb, stall_dump_timeout=0, exit_func=fake_exit,
                   position=lambda: {"phase": "training", "epoch": 1, "step": 5})
    g.calls, g.fired = calls, fired
    yield g
    g.close()


def test_nested_deadlines_exit_cancels(guards):
    with guards.deadline("step", 3.0):
        with guards.deadline("cache_io", 0.3):
            pass
        with guards.deadline("cache_io", 0.3):
            time.sleep(0.05)
        time.sleep(0.8)  # both inner bounds have passed by now, but they were left in time
    time.sleep(0.5)
    assert not guards.fired.is_set()
    assert guards._table == {}


def test_overlapping_inner_deadline_fires_with_its_site(guards, tmp_path, capsys):
    t0 = time.monotonic()
    with guards.deadline("step", 30.0):
        with guards.deadline("save", 0.5, detail="writing x-state"):
            assert guards.fired.wait(5)
    assert guards.calls[0] == EXIT_HANG
    assert 0.4 < time.monotonic() - t0 < 3.0
    err = capsys.readouterr().err
    assert "HANG GUARD [save]: writing x-state within 0.5 s (phase training, epoch 1, step 5)" in err
    assert "--save_timeout" in err
    assert read_heartbeat(tmp_path)["phase"] == "failed"


def test_disabled_deadline_and_overhead_benchmark(guards):
    assert guards.deadline("dataloader", 0).__class__.__name__ == "nullcontext"
    assert guards.deadline("dataloader", None).__class__.__name__ == "nullcontext"
    with guards.deadline("sample", 0) as d:
        d.detail = "sample image 3"  # same code in the caller whether the bound is on or off
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        with guards.deadline("dataloader", 300):
            pass
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    print(f"\nhang guard deadline enter+exit: {per_call_us:.2f} us per call")
    assert per_call_us < 200  # loose: a shared 2-core box; a thread-per-call design costs ~100x more
    assert guards._table == {}


def test_progress_is_cheap_per_step(tmp_path):
    g = HangGuards(tmp_path, None, stall_dump_timeout=600)
    try:
        n = 5000
        t0 = time.perf_counter()
        for _ in range(n):
            g.progress()
        per_call_us = (time.perf_counter() - t0) / n * 1e6
        print(f"\nhang guard progress(): {per_call_us:.2f} us per call")
        assert per_call_us < 100
        assert 0 < time.monotonic() - g._armed_at < 5  # it did arm the stall timer
    finally:
        g.close()


def test_hints_cover_every_site():
    assert set(SITES) == {"dataloader", "block_swap", "cache_io", "sample", "save", "ddp", "step"}
    for site in SITES.values():
        assert len(site.hint) > 40
    for site, flag in (("dataloader", "--dataloader_timeout"), ("block_swap", "--block_swap_timeout"),
                       ("cache_io", "--cache_io_timeout"), ("sample", "--sample_timeout"),
                       ("save", "--save_timeout"), ("ddp", "--ddp_timeout")):
        assert flag in SITES[site].hint and SITES[site].flag == flag


def test_fire_prints_the_sites_hint_from_the_table(guards, capsys):
    with pytest.raises(SystemExit):
        guards.fire("save", "writing x-state within 1 s")
    err = capsys.readouterr().err
    assert f"Try: {SITES['save'].hint}" in err


def test_is_dataloader_timeout():
    assert is_dataloader_timeout(RuntimeError("DataLoader timed out after 5 seconds"))
    assert not is_dataloader_timeout(RuntimeError("CUDA out of memory"))
    assert not is_dataloader_timeout(TimeoutError("DataLoader timed out after 5 seconds"))


def test_close_removes_empty_pending_files(tmp_path):
    g = HangGuards(tmp_path, None, stall_dump_timeout=100)
    g.progress()
    assert list(tmp_path.glob(".*-dump-*"))
    g.close()
    assert list(tmp_path.iterdir()) == []
    g.progress()  # after close: a no-op, no error
    with g.deadline("step", 1):
        pass


class FakeCacheReadTimeout(TimeoutError):
    pass


def test_guard_iterator_maps_worker_errors_to_sites(guards, capsys):
    def batches():
        yield 1
        raise FakeCacheReadTimeout("reading /data/a_flux.npz took longer than --cache_io_timeout 30 s")

    got = []
    with pytest.raises(SystemExit):
        for b in guards.guard_iterator(batches(), seconds=5, map_errors=((FakeCacheReadTimeout, "cache_io"),)):
            got.append(b)
    assert got == [1] and guards.calls == [EXIT_HANG]
    err = capsys.readouterr().err
    assert "HANG GUARD [cache_io]: FakeCacheReadTimeout: reading /data/a_flux.npz" in err
    assert guards._table == {}  # the deadline was left on the way out


class _StalledCacheDataset:
    """Every item is a cache read that timed out (raised inside the DataLoader worker process)."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        from library.npz_io import CacheReadTimeout

        raise CacheReadTimeout(f"/data/img{i}_flux.npz", 30)


def test_cache_timeout_in_a_dataloader_worker_reaches_the_cache_io_guard_by_type(guards, capsys):
    """torch rebuilds a worker's exception from its message; CacheReadTimeout survives that with its type,
    so map_errors (an isinstance check, no class-name strings) sends it to the cache_io guard."""
    import torch

    from library.errors import HangError
    from library.npz_io import CacheReadTimeout

    assert issubclass(CacheReadTimeout, HangError)
    loader = torch.utils.data.DataLoader(_StalledCacheDataset(), batch_size=None, num_workers=1, timeout=60)
    with pytest.raises(SystemExit):
        for _ in guards.guard_iterator(loader, seconds=60, map_errors=((CacheReadTimeout, "cache_io"),)):
            pass
    assert guards.calls == [EXIT_HANG]
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("HANG GUARD ["))
    assert line.startswith("HANG GUARD [cache_io]: CacheReadTimeout: Caught CacheReadTimeout in DataLoader worker")
    assert f"Try: {SITES['cache_io'].hint}" in err and "/data/img0_flux.npz" in err


def test_guard_iterator_passes_other_errors_and_finishes(guards):
    assert list(guards.guard_iterator(iter(range(3)), seconds=5)) == [0, 1, 2]

    def broken():
        yield 0
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        list(guards.guard_iterator(broken(), seconds=5))
    assert not guards.calls
