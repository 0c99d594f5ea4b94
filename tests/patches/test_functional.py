"""Behaviour of patched fixture checkouts: bounded swap wait, bounded npz read, DataLoader keywords, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from patches import apply

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses a FIFO and POSIX signals")


@pytest.fixture
def patched(checkout, capsys):
    assert apply.main([str(checkout)]) == 0
    capsys.readouterr()
    return checkout


def _python(venv_python, cwd, code, env=None, timeout=60):
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(
        [venv_python, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def test_swap_wait_on_a_never_completing_future_exits_within_bound(patched, venv_python):
    code = """
        import sys, threading, time
        sys.path.insert(0, ".")
        from library.custom_offloading_utils import ModelOffloader
        off = ModelOffloader(4, 2)
        gate = threading.Event()
        # a swap job stuck forever in the (non-daemon) worker thread: a plain raise would hang at exit
        off.futures[3] = off.thread_pool.submit(gate.wait)
        off.wait_for_block(3)
        print("UNREACHABLE")
    """
    proc, elapsed = _python(venv_python, patched, code, {"FLUXTRAIN_BLOCK_SWAP_TIMEOUT": "1"}, timeout=30)
    assert proc.returncode == 124, proc.stderr
    assert "UNREACHABLE" not in proc.stdout
    assert "HANG GUARD [block_swap]" in proc.stderr and "block 3" in proc.stderr
    assert "_wait_blocks_move" in proc.stderr  # the stack dump shows where it waited
    assert elapsed < 15


def test_bounded_npz_read_of_a_fifo_errors_naming_the_file(patched, venv_python):
    fifo = patched / "stuck_flux_te.npz"
    os.mkfifo(fifo)
    code = f"""
        import sys, threading
        sys.path.insert(0, ".")
        from library.strategy_flux import FluxTextEncoderOutputsCachingStrategy
        strategy = FluxTextEncoderOutputsCachingStrategy(True, False)
        def attempt(tag):
            try:
                strategy.load_outputs_npz({str(fifo)!r})
            except TimeoutError as exc:
                print(tag, type(exc).__name__, exc, flush=True)
        attempt("main")  # SIGALRM path
        worker = threading.Thread(target=attempt, args=("thread",))  # deadline-thread path
        worker.start(); worker.join()
    """
    proc, elapsed = _python(venv_python, patched, code, {"FLUXTRAIN_CACHE_IO_TIMEOUT": "1"}, timeout=30)
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["main", "thread"], proc.stderr
    for line in lines:
        assert "CacheReadTimeout" in line and str(fifo) in line and "FLUXTRAIN_CACHE_IO_TIMEOUT" in line
    assert elapsed < 15


def test_cache_round_trip_is_atomic_and_materialised(patched, venv_python):
    code = """
        import os, sys
        import numpy as np
        sys.path.insert(0, ".")
        from library.strategy_base import LatentsCachingStrategy
        from library.strategy_flux import FluxTextEncoderOutputsCachingStrategy
        te = FluxTextEncoderOutputsCachingStrategy(True, False)
        path = os.path.abspath("img_flux_te.npz")
        te.save_outputs(path, np.ones(4), np.zeros((3, 2)), np.zeros((3, 3)), np.ones(3))
        out = te.load_outputs_npz(path)
        assert te.is_disk_cached_outputs_expected(path)
        lat = LatentsCachingStrategy(True, 1, False)
        lp = os.path.abspath("img_0064x0064_flux.npz")
        lat.save_latents_to_disk(lp, np.ones((16, 8, 8)), (64, 64), (0, 0, 64, 64), "_8x8")
        lat.save_latents_to_disk(lp, np.ones((16, 4, 4)), (32, 32), (0, 0, 32, 32), "_4x4")
        got = lat._default_load_latents_from_disk(8, lp, (32, 32))
        print(sorted(os.listdir(".")))
        print(out[0].tolist(), out[1].shape, got[0].shape, got[1])
    """
    proc, _ = _python(venv_python, patched, code)
    assert proc.returncode == 0, proc.stderr
    listing, values = proc.stdout.splitlines()
    assert ".tmp-" not in listing  # no temp file left behind
    assert values == "[1.0, 1.0, 1.0, 1.0] (3, 2) (16, 4, 4) [32, 32]"


def test_patched_dataloaders_and_state_save_in_both_layouts(make_checkout, capsys, venv_python, tmp_path):
    roots = []
    for layout in ("monolith_2026_02", "split_2026_05"):
        root = make_checkout(layout)
        assert apply.main([str(root)]) == 0
        roots.append(str(root))
    capsys.readouterr()
    code = f"""
        import json, os, sys, types
        import torch
        from accelerate import Accelerator
        results = []
        for root in {roots!r}:
            sys.path.insert(0, root)
            import train_network
            from library import train_util
            args = types.SimpleNamespace(max_data_loader_n_workers=2, persistent_data_loader_workers=False)
            train_dl, val_dl = train_network.build_dataloaders(args, list(range(4)), None, lambda b: b)
            args0 = types.SimpleNamespace(max_data_loader_n_workers=0, persistent_data_loader_workers=False)
            zero_dl, _ = train_network.build_dataloaders(args0, list(range(4)), None, lambda b: b)
            acc = Accelerator(cpu=True)
            model = acc.prepare(torch.nn.Linear(2, 2))
            save_args = types.SimpleNamespace(output_name="demo", output_dir=os.path.join(root, "out"),
                                              save_last_n_steps_state=None, save_last_n_steps=None)
            acc.step = 3
            train_util.save_and_remove_state_stepwise(save_args, acc, 5)
            pkl = os.path.join(root, "out", "demo-step00000005-state", "random_states_0.pkl")
            saved_step = torch.load(pkl, weights_only=False)["step"]
            results.append([train_dl.timeout, train_dl.pin_memory, val_dl.timeout, val_dl.pin_memory,
                            zero_dl.timeout, saved_step, acc.step])
            sys.path.remove(root)
            for name in [m for m in sys.modules if m == "train_network" or m.startswith("library")]:
                del sys.modules[name]
        print(json.dumps(results))
    """
    proc, _ = _python(venv_python, tmp_path, code, {"FLUXTRAIN_DATALOADER_TIMEOUT": "123"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == [[123.0, True, 123.0, True, 0.0, 5, 3]] * 2
