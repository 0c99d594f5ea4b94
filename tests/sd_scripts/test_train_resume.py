"""Exact resume: chains of interrupted runs end bit-identical to one uninterrupted run.

Each interrupted run hard-exits right after a step (FLUXTRAIN_EXIT_AFTER_STEP, the same as
a kill -9 once the step's checkpoint is complete) and the next one continues with
`--resume auto`. Per-step losses (FLUXTRAIN_LOSS_LOG) and final LoRA tensors must match.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import make_dataset, run_trainer, trainer_args

TOTAL_STEPS = 10  # 4 batches per epoch: resumes land mid-epoch and on epoch edges


def train_chain(models, toml, out, stops: list[int]) -> tuple[dict, list[str]]:
    loss_log = out.parent / f"{out.name}-loss.csv"
    args = trainer_args(models, toml, out, "--max_train_steps", str(TOTAL_STEPS), "--save_every_n_steps", "1",
                        "--save_state", "--save_last_n_steps_state", "2", "--lr_scheduler", "linear",
                        "--lr_warmup_steps", "2")
    for i, stop in enumerate(stops + [None]):
        env = {"FLUXTRAIN_LOSS_LOG": str(loss_log)}
        if stop is not None:
            env["FLUXTRAIN_EXIT_AFTER_STEP"] = str(stop)
        run_args = args + (["--resume", "auto"] if i else [])
        proc = run_trainer(run_args, env=env)
        expected = 75 if stop is not None else 0
        assert proc.returncode == expected, proc.stdout[-2000:] + proc.stderr[-4000:]
        if i:
            assert "resumed from" in proc.stdout
    return load_file(str(out / "tiny.safetensors")), loss_log.read_text().splitlines()


@pytest.fixture(scope="module")
def baseline(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    _, toml = make_dataset(root, count=4, size=64)
    tensors, losses = train_chain(tiny_models, toml, root / "base", [])
    return root, toml, tensors, losses


@pytest.mark.slow
@pytest.mark.parametrize("resumes", [1, 5])  # 2 stops added ~19 s and nothing 1 and 5 do not cover
def test_resume_chain_is_bit_identical(baseline, tiny_models, resumes):
    root, toml, base_tensors, base_losses = baseline
    stops = sorted(random.Random(resumes).sample(range(1, TOTAL_STEPS), resumes))
    tensors, losses = train_chain(tiny_models, toml, root / f"chain{resumes}", stops)
    assert [line.split(",")[0] for line in losses] == [str(s) for s in range(1, TOTAL_STEPS + 1)]
    assert losses == base_losses, f"stops at {stops}"
    assert tensors.keys() == base_tensors.keys()
    for key in base_tensors:
        assert torch.equal(tensors[key], base_tensors[key]), key
    manifest = json.loads((root / f"chain{resumes}" / "tiny-state" / "checkpoint.json").read_text())
    assert manifest["step"] == TOTAL_STEPS  # absolute step numbering survives every resume


def test_resume_auto_with_nothing_to_resume_starts_fresh(tiny_models, tmp_path):
    _, toml = make_dataset(tmp_path, count=2, size=64)
    proc = run_trainer(trainer_args(tiny_models, toml, tmp_path / "o", "--max_train_steps", "1", "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no valid state folder" in proc.stdout


def test_resume_with_different_network_dim_names_both_values(baseline, tiny_models, tmp_path):
    root, toml, _, _ = baseline
    state = root / "base" / "tiny-state"
    args = trainer_args(tiny_models, toml, tmp_path / "o", "--max_train_steps", str(TOTAL_STEPS + 2),
                        "--resume", str(state))
    args[args.index("--network_dim") + 1] = "8"
    proc = run_trainer(args)
    assert proc.returncode != 0
    assert "network_dim" in proc.stderr and "4" in proc.stderr and "8" in proc.stderr


def test_finished_run_continues_when_epochs_are_raised(baseline, tiny_models):
    root, toml, _, _ = baseline
    out = root / "base"
    args = trainer_args(tiny_models, toml, out, "--max_train_steps", str(TOTAL_STEPS + 2), "--save_state",
                        "--resume", str(out / "tiny-state"), "--lr_scheduler", "linear", "--lr_warmup_steps", "2")
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "tiny-state" / "checkpoint.json").read_text())["step"] == TOTAL_STEPS + 2


def test_upstream_made_state_folder_resumes(baseline, tiny_models, tmp_path):
    """A state folder as upstream sd-scripts writes it: no manifest, and an accelerate 0.32/0.33-era
    random-state pickle without `step`. The step comes from train_state.json; the run finishes."""
    import shutil

    root, toml, _, _ = baseline
    out = tmp_path / "o"
    out.mkdir()
    src = sorted((root / "base").glob("tiny-step*-state"))[-1]
    state = out / "tiny-step00000009-state"
    shutil.copytree(src, state)
    (state / "checkpoint.json").unlink()
    rng_file = state / "random_states_0.pkl"
    rng = torch.load(rng_file, weights_only=False)  # accelerate writes it with torch.save
    rng.pop("step", None)
    torch.save(rng, rng_file)
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 3, "current_step": 9}))
    args = trainer_args(tiny_models, toml, out, "--max_train_steps", str(TOTAL_STEPS), "--resume", "auto")
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 9" in proc.stdout
    assert "steps: 100%" in proc.stderr and f"{TOTAL_STEPS}/{TOTAL_STEPS}" in proc.stderr
    assert (out / "tiny.safetensors").is_file()
