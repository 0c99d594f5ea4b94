"""Bounded npz reads (main thread, worker thread, injected hang) and atomic npz writes."""

from __future__ import annotations

import os
import signal
import threading
import time
import zipfile

import numpy as np
import pytest

from library import npz_io
from library.npz_io import CacheReadTimeout, atomic_savez, bounded_npz_load, remove_stale_temps

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "setitimer"),
                                reason="FIFOs and interval timers are POSIX only")
BOUND = 0.5
SLACK = 2.0  # generous for a loaded 2-core CI box; a real hang would never return at all


def _release_fifo(path) -> None:
    """Open and close the write end so a reader still blocked on the FIFO gets EOF and its thread ends."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # no reader left
    os.close(fd)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "stalled_flux.npz"
    os.mkfifo(path)
    yield path
    _release_fifo(path)


def test_atomic_savez_round_trip_keeps_exact_name(tmp_path):
    target = tmp_path / "img_0064x0064_flux.npz"
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "fp": np.array("abc")}
    assert atomic_savez(target, arrays) == target
    loaded = bounded_npz_load(target, timeout=5)
    assert set(loaded) == {"a", "fp"}
    np.testing.assert_array_equal(loaded["a"], arrays["a"])
    assert str(loaded["fp"]) == "abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp left, no ".npz.npz"

    other = tmp_path / "plain.cache"
    atomic_savez(other, arrays)
    assert other.exists() and not (tmp_path / "plain.cache.npz").exists()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x_flux_te.npz"
    atomic_savez(target, {"v": np.ones(3)})
    before = target.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")  # a killed writer's half file
        raise OSError("disk full")

    monkeypatch.setattr(npz_io.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        atomic_savez(target, {"v": np.zeros(3)})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_keys_subset_missing_key_and_truncated(tmp_path):
    target = tmp_path / "k.npz"
    atomic_savez(target, {"a": np.ones(2), "b": np.zeros(2)})
    assert set(bounded_npz_load(target, timeout=5, keys=["b"])) == {"b"}
    with pytest.raises(KeyError, match="missing key"):
        bounded_npz_load(target, timeout=5, keys=["nope"])
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises((zipfile.BadZipFile, ValueError, EOFError, OSError)):
        bounded_npz_load(target, timeout=5)


@posix_only
def test_fifo_read_times_out_in_main_thread(fifo):
    handler_before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(CacheReadTimeout) as info:
        bounded_npz_load(fifo, timeout=BOUND)
    elapsed = time.monotonic() - start
    assert BOUND * 0.9 <= elapsed < BOUND + SLACK
    assert str(fifo) in str(info.value) and "--cache_io_timeout" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    # the alarm is disarmed and the previous handler is back
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    assert signal.getsignal(signal.SIGALRM) is handler_before


@posix_only
def test_fifo_read_times_out_in_worker_thread_without_signals(fifo, monkeypatch):
    installed = []
    monkeypatch.setattr(npz_io.signal, "signal", lambda *a: installed.append(a))
    outcome = {}

    def worker():
        start = time.monotonic()
        try:
            bounded_npz_load(fifo, timeout=BOUND)
        except BaseException as exc:
            outcome["exc"] = exc
        outcome["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(BOUND + SLACK + 2)
    assert not thread.is_alive(), "bounded read in a worker thread did not return"
    assert isinstance(outcome["exc"], CacheReadTimeout)
    assert BOUND * 0.9 <= outcome["elapsed"] < BOUND + SLACK
    assert installed == []  # never installs a signal handler outside the main thread


@posix_only
def test_foreign_alarm_is_not_clobbered(fifo):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(a))
    try:
        signal.setitimer(signal.ITIMER_REAL, 60)
        with pytest.raises(CacheReadTimeout):
            bounded_npz_load(fifo, timeout=BOUND)
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 50  # someone else's timer still runs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


@posix_only
def test_injected_cache_io_hang_is_bounded(tmp_path, monkeypatch):
    target = tmp_path / "ok.npz"
    atomic_savez(target, {"a": np.ones(1)})
    monkeypatch.setenv("FLUXTRAIN_INJECT_HANG", "cache_io")
    start = time.monotonic()
    with pytest.raises(CacheReadTimeout):
        bounded_npz_load(target, timeout=BOUND)
    assert time.monotonic() - start < BOUND + SLACK
    monkeypatch.delenv("FLUXTRAIN_INJECT_HANG")
    assert bounded_npz_load(target, timeout=BOUND)["a"][0] == 1


def test_worker_exception_round_trips_like_torch_reraise():
    # torch re-raises a worker's exception as type(exc)(message); that must keep the type and text
    original = CacheReadTimeout("/data/x_flux.npz", 3)
    again = type(original)(str(original))
    assert isinstance(again, CacheReadTimeout) and str(again) == str(original)


def test_remove_stale_temps_skips_live_writers(tmp_path):
    final = tmp_path / "a_flux.npz"
    dead = tmp_path / f".{final.name}.tmp-99999999-0000abcd"
    live = tmp_path / f".{final.name}.tmp-{os.getppid()}-0000abcd"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    assert remove_stale_temps(final) == [dead]
    assert live.exists() and not dead.exists()
