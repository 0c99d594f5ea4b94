"""The installed helper module on its own: env parsing, resume fallback, step bookkeeping, atomic writes."""

from __future__ import annotations

import importlib.util
import json
import random
import time

import numpy as np
import pytest

from patches import engine


@pytest.fixture(scope="module")
def helper():
    spec = importlib.util.spec_from_file_location("fluxtrain_hardening_under_test", engine.RUNTIME_HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Unpicklable:
    def __reduce__(self):
        raise ValueError("this object refuses to be pickled")


class FakeAccelerator:
    def __init__(self, accum=1, step=0, fail_with=None):
        self.gradient_accumulation_steps = accum
        self.step = step
        self.process_index = 0
        self.fail_with = fail_with
        self.saved_steps = []

    def save_state(self, output_dir):
        self.saved_steps.append((output_dir, self.step))

    def load_state(self, input_dir):
        if self.fail_with is not None:
            raise self.fail_with


def test_env_seconds_defaults_overrides_and_bad_values(helper, monkeypatch):
    monkeypatch.delenv("FLUXTRAIN_DATALOADER_TIMEOUT", raising=False)
    assert helper.dataloader_timeout(2) == 300.0 and helper.dataloader_timeout(0) == 0.0
    monkeypatch.setenv("FLUXTRAIN_DATALOADER_TIMEOUT", "7.5")
    assert helper.dataloader_timeout(1) == 7.5
    monkeypatch.setenv("FLUXTRAIN_DATALOADER_TIMEOUT", "soon")
    assert helper.dataloader_timeout(1) == 300.0
    assert helper.harden_dataloader_kwargs({"num_workers": 0, "pin_memory": False}) == {
        "num_workers": 0, "pin_memory": False, "timeout": 0.0,
    }  # fmt: skip


def test_save_state_at_step_records_global_step_for_the_save_only(helper):
    acc = FakeAccelerator(accum=2, step=17)
    helper.save_state_at_step(acc, 5, "dir-a")

    def training_loop():
        global_step = 9  # noqa: F841 - found by the helper through the call stack
        return save_site()

    def save_site():  # like save_state_on_train_end: no step argument of its own
        helper.save_state_at_step(acc, None, "dir-b")

    training_loop()
    assert acc.saved_steps == [("dir-a", 10), ("dir-b", 18)]
    assert acc.step == 17


def test_load_state_fallback_restores_rng_and_step_after_keyerror(helper, tmp_path):
    torch = pytest.importorskip("torch")
    random.seed(1234)
    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}
    states["torch_manual_seed"] = torch.get_rng_state()
    expected = random.random()
    torch.save(states, tmp_path / "random_states_0.pkl")  # an RNG pickle without "step"
    (tmp_path / "train_state.json").write_text(json.dumps({"current_epoch": 2, "current_step": 7}))
    random.seed(99)
    acc = FakeAccelerator(fail_with=KeyError("step"))
    assert helper.load_state_with_fallback(acc, str(tmp_path)) is None
    assert random.random() == expected
    assert acc.step == 7
    with pytest.raises(KeyError, match="optimizer"):
        helper.load_state_with_fallback(FakeAccelerator(fail_with=KeyError("optimizer")), str(tmp_path))


def test_load_state_fallback_survives_an_unreadable_pickle(helper, tmp_path):
    (tmp_path / "random_states_0.pkl").write_bytes(b"not a pickle")
    acc = FakeAccelerator(fail_with=KeyError("step"))
    helper.load_state_with_fallback(acc, str(tmp_path))
    assert acc.step == 0


def test_atomic_savez_appends_suffix_and_leaves_no_temp(helper, tmp_path):
    helper.atomic_savez(tmp_path / "cache", a=np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]
    loaded = helper.bounded_npz_load(tmp_path / "cache.npz")
    assert loaded.files == ["a"] and "a" in loaded and loaded["a"].tolist() == [0, 1, 2]
    unpicklable = np.empty(1, dtype=object)
    unpicklable[0] = Unpicklable()
    with pytest.raises(ValueError, match="refuses"):  # fails mid-write: the temp file must not survive
        helper.atomic_savez(tmp_path / "bad.npz", a=np.arange(3), b=unpicklable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]


def test_injected_cache_io_hang_is_cut_by_the_bound(helper, tmp_path, monkeypatch):
    helper.atomic_savez(tmp_path / "ok.npz", a=np.arange(2))
    monkeypatch.setenv("FLUXTRAIN_INJECT_HANG", "cache_io")
    monkeypatch.setenv("FLUXTRAIN_CACHE_IO_TIMEOUT", "0.3")
    start = time.monotonic()
    with pytest.raises(helper.CacheReadTimeout, match="ok.npz"):
        helper.bounded_npz_load(tmp_path / "ok.npz")
    assert time.monotonic() - start < 3
    monkeypatch.delenv("FLUXTRAIN_INJECT_HANG")
    assert helper.bounded_npz_load(tmp_path / "ok.npz")["a"].tolist() == [0, 1]
