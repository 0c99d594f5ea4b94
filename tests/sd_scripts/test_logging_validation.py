"""--logging_dir/--log_with and --validation_split on real tiny training runs.

Two runs are shared by every test here: an uninterrupted 4-step run (A) and a run resumed with
--resume auto from A's step-2 state folder, copied into a fresh output folder (C). The event files are read back with TensorBoard's own
EventAccumulator; expected values are written from upstream's formulas, not from our code.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from train_helpers import make_dataset, run_trainer, trainer_args  # noqa: E402

LR, MIN_RATIO, STEPS, PER_EPOCH = 1e-3, 0.1, 4, 3  # 4 images, 1 held out -> 3 batches per epoch
RUN_FLAGS = ["--max_train_steps", str(STEPS), "--validation_split", "0.25", "--validate_every_n_steps", "1",
             "--save_every_n_steps", "2", "--save_state", "--lr_scheduler", "cosine_with_min_lr",
             "--lr_scheduler_min_lr_ratio", str(MIN_RATIO), "--log_prefix", "pre_", "--log_tracker_name", "mytrack",
             "--log_config", "--wandb_api_key", "secret-key-never-logged"]


def scalars(logging_dir: Path, tracker: str = "mytrack") -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every run folder under logging_dir."""
    result: dict[str, dict[int, float]] = {}
    for folder in sorted(logging_dir.glob(f"pre_*/{tracker}")):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            result.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return result


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    _, toml = make_dataset(root / "data", count=4)
    loss_log = root / "losses_a.csv"
    a = run_trainer(trainer_args(tiny_models, toml, root / "a", "--logging_dir", str(root / "logs_a"), *RUN_FLAGS),
                    env={"FLUXTRAIN_LOSS_LOG": str(loss_log)})
    assert a.returncode == 0, a.stderr[-3000:]
    shutil.copytree(root / "a" / "tiny-step00000002-state", root / "c" / "tiny-step00000002-state")
    c = run_trainer(trainer_args(tiny_models, toml, root / "c", "--logging_dir", str(root / "logs_c"),
                                 "--resume", "auto", *RUN_FLAGS))
    assert c.returncode == 0, c.stderr[-3000:]
    losses = [float(line.split(",")[1]) for line in loss_log.read_text().splitlines()]
    return {"root": root, "a": scalars(root / "logs_a"), "c": scalars(root / "logs_c"), "losses": losses,
            "stdout_a": a.stdout, "stdout_c": c.stdout}


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores scalars as float32


def test_upstream_tags_layout_and_values(runs):
    a, losses = runs["a"], runs["losses"]
    assert set(a) == {"loss/current", "loss/average", "lr/unet", "lr/textencoder 1 ", "loss/epoch_average",
                      "loss/validation/step_average", "loss/validation/step_divergence",
                      "loss/validation/epoch_average", "loss/validation/epoch_divergence"}
    # the folder layout upstream gets from accelerate: <logging_dir>/<prefix><YYYYmmddHHMMSS>/<tracker name>/
    (folder,) = list((runs["root"] / "logs_a").glob("pre_*/mytrack"))
    assert len(folder.parent.name) == len("pre_") + 14 and list(folder.glob("events.out.tfevents.*"))
    assert a["loss/current"] == {step + 1: f32(loss) for step, loss in enumerate(losses)}
    # upstream's LossRecorder: mean of the latest loss at each batch position of an epoch (3 per epoch)
    l1, l2, l3, l4 = losses
    expected_avg = {1: l1, 2: (l1 + l2) / 2, 3: (l1 + l2 + l3) / 3, 4: (l4 + l2 + l3) / 3}
    assert a["loss/average"] == pytest.approx({k: f32(v) for k, v in expected_avg.items()}, rel=1e-6)
    # TB step = epoch; the last, partial epoch is closed too (as upstream)
    assert a["loss/epoch_average"] == pytest.approx({1: f32(expected_avg[3]), 2: f32(expected_avg[4])}, rel=1e-6)
    # cosine_with_min_lr as upstream passes it (num_cycles halved): lr = LR * (r + (1 - r) * (1 + cos(pi p)) / 2)
    expected_lr = {k: f32(LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * k / STEPS))))
                   for k in range(1, STEPS + 1)}
    assert a["lr/unet"] == pytest.approx(expected_lr, rel=1e-6)
    assert a["lr/textencoder 1 "] == pytest.approx(expected_lr, rel=1e-6)
    val = a["loss/validation/step_average"]
    assert sorted(val) == [1, 2, 3, 4]
    assert a["loss/validation/epoch_average"] == {1: val[3], 2: val[4]}  # epochs end at steps 3 and 4
    for step in val:
        assert a["loss/validation/step_divergence"][step] == pytest.approx(val[step] - a["loss/average"][step],
                                                                           abs=1e-6)
    assert "validation loss at step 2:" in runs["stdout_a"]


def test_log_config_records_flags_without_secrets(runs):
    (folder,) = list((runs["root"] / "logs_a").glob("pre_*/mytrack"))
    blob = b"".join(p.read_bytes() for p in folder.rglob("events.out.tfevents.*"))
    assert b"max_train_steps" in blob and b"lr_scheduler_min_lr_ratio" in blob  # hparams written
    assert b"secret-key-never-logged" not in blob


def test_resume_continues_the_step_axis_with_identical_values(runs):
    a, c = runs["a"], runs["c"]
    assert "resumed from" in runs["stdout_c"] and "step 2" in runs["stdout_c"]
    assert sorted(c["loss/current"]) == [3, 4]  # absolute steps: the curve continues, it does not restart at 0
    for tag, values in c.items():
        for step, value in values.items():
            assert a[tag][step] == value, f"{tag} at {step}: resumed {value} vs uninterrupted {a[tag][step]}"
    assert c["loss/validation/step_average"] == {3: a["loss/validation/step_average"][3],
                                                 4: a["loss/validation/step_average"][4]}


def test_checkpoints_record_their_validation_loss_and_best_is_named(runs, capsys):
    from safetensors import safe_open

    from tools import find_checkpoint

    out, val = runs["root"] / "a", runs["a"]["loss/validation/step_average"]
    manifest = json.loads((out / "tiny-step00000002-state" / "checkpoint.json").read_text())
    assert manifest["validation"]["validation_step"] == 2
    assert f32(manifest["validation"]["validation_loss"]) == val[2]
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert f32(float(meta["fluxtrain_validation_loss"])) == val[4]
    assert meta["fluxtrain_validation_step"] == "4" and meta["ss_num_validation_images"] == "1"
    assert find_checkpoint.main([str(out), "--best", "--type", "model", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ranked = [(r["validation_loss"], Path(r["path"]).name) for r in report["ranked"]]
    assert [loss for loss, _ in ranked] == sorted(loss for loss, _ in ranked)
    assert {name for _, name in ranked} == {"tiny-step00000002.safetensors", "tiny-step00000004.safetensors",
                                            "tiny.safetensors"}
    assert f32(report["best"]["validation_loss"]) == min(val[2], val[4])
    empty = runs["root"] / "empty"
    empty.mkdir()
    assert find_checkpoint.main([str(empty), "--best"]) == 3
