"""Per-step augmentation through the real trainer: --random_crop and --color_aug without a latent cache train,
write a LoRA with upstream's metadata, and an interrupted run resumed with a DataLoader worker ends bit-identical
to the uninterrupted one; with a latent cache flag the run stops before any model loads (exit 2)."""
from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import load_file

from train_helpers import make_dataset, run_trainer, run_trainer_in_process, trainer_args

STEPS = 4  # 4 images, batch 1: the interruption after step 2 lands mid-epoch


def _augmented_args(models, toml, out, *extra):
    args = trainer_args(models, toml, out, "--max_train_steps", str(STEPS), "--random_crop", "--color_aug",
                        "--flip_aug", "--save_every_n_steps", "2", "--save_state", "--save_last_n_steps_state", "1",
                        *extra)
    return [a for a in args if a != "--cache_latents_to_disk"]  # no latent cache: images encoded every step


def _train_in_process(args, loss_log, monkeypatch, capsys) -> tuple[int, str, list[str]]:
    """The uninterrupted and the resumed run in this process (no interpreter start-up: the test stays short)."""
    monkeypatch.setenv("FLUXTRAIN_LOSS_LOG", str(loss_log))
    code = run_trainer_in_process(args)
    return code, "".join(capsys.readouterr()), loss_log.read_text().splitlines()


def test_augmented_run_encodes_per_step_and_resumes_bit_identically(tiny_models, tmp_path, monkeypatch, capsys):
    image_dir, toml = make_dataset(tmp_path, count=4, size=64)
    # resolution 48 without buckets: random_crop takes a 48x48 window of each 64x64 image
    toml.write_text(toml.read_text().replace("resolution = 64", "resolution = 48"), encoding="utf-8")
    base_out, chain_out = tmp_path / "base", tmp_path / "chain"
    code, out, base_losses = _train_in_process(_augmented_args(tiny_models, toml, base_out), tmp_path / "base.csv",
                                               monkeypatch, capsys)
    assert code == 0 and "per-step image augmentation" in out, out[-3000:]
    assert not list(image_dir.glob("*_flux.npz"))  # nothing cached
    assert [line.split(",")[0] for line in base_losses] == [str(s) for s in range(1, STEPS + 1)]

    proc = run_trainer(_augmented_args(tiny_models, toml, chain_out),  # a hard exit: its own process
                       env={"FLUXTRAIN_LOSS_LOG": str(tmp_path / "chain.csv"), "FLUXTRAIN_EXIT_AFTER_STEP": "2"})
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-3000:]
    resumed = _augmented_args(tiny_models, toml, chain_out, "--resume", "auto", "--max_data_loader_n_workers", "1")
    code, out, chain_losses = _train_in_process(resumed, tmp_path / "chain.csv", monkeypatch, capsys)
    assert code == 0 and "resumed from" in out, out[-3000:]
    assert chain_losses == base_losses  # every step's loss, bit for bit (repr of the float)
    base, chain = load_file(str(base_out / "tiny.safetensors")), load_file(str(chain_out / "tiny.safetensors"))
    assert base.keys() == chain.keys() and all(base[k].equal(chain[k]) for k in base)

    with safe_open(str(base_out / "tiny.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_color_aug"], meta["ss_random_crop"], meta["ss_flip_aug"]) == ("True", "True", "True")
    assert meta["ss_cache_latents"] == "False" and meta["ss_face_crop_aug_range"] == "None"
    subset = json.loads(meta["ss_datasets"])[0]["subsets"][0]
    assert (subset["color_aug"], subset["random_crop"]) == (True, True)


def test_latent_cache_flag_with_augmentation_exits_2_before_models_load(tiny_models, tmp_path, capsys):
    _, toml = make_dataset(tmp_path, count=1, size=64)
    code = run_trainer_in_process(trainer_args(tiny_models, toml, tmp_path / "o", "--random_crop"))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2 and "--random_crop" in text and "--cache_latents_to_disk" in text, text[-2000:]
    toml.write_text(toml.read_text() + "  color_aug = true\n", encoding="utf-8")  # the dataset.toml key
    code = run_trainer_in_process(trainer_args(tiny_models, toml, tmp_path / "o", "--cache_latents"))
    text = "".join(capsys.readouterr())
    assert code == 2 and "color_aug (set for [[datasets.subsets]] #1" in text and "--cache_latents_to_disk" in text
    assert "preparing accelerator" not in text and not (tmp_path / "o" / "tiny.safetensors").exists()
