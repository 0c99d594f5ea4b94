"""`generate`: clear errors before anything is written, preset defaults, files and options."""

from __future__ import annotations

import json

import pytest

from fg_helpers import make_images, setup_lora
from fluxgym.cli import main
from fluxgym.prepare import prepare_dataset


def _gen(root, *args) -> int:
    return main(["generate", "lora", "--root", str(root), *args])


@pytest.fixture
def prepared(root, tmp_path):
    prepare_dataset(make_images(tmp_path / "src", 2), root / "datasets" / "lora", trigger="t", resolution=64)
    return root


@pytest.mark.parametrize("args, message", [
    (["--vram", "16G", "--base-model", "nope"], "unknown base model 'nope'"),
    (["--vram", "16G", "--resolution", "500"], "multiple of 16"),
    (["--vram", "16G", "--epochs", "0"], "--epochs must be at least 1"),
    (["--vram", "16G", "--lr", "fast"], "--lr must be a positive number"),
    (["--vram", "16G", "--resume", "/no/such/state"], "state folder not found"),
    (["--vram", "16G", "--sample-prompts", "/no/such/file"], "file not found"),
])
def test_bad_values_are_clear_errors(prepared, capsys, args, message):
    assert _gen(prepared, *args) == 2
    assert message in capsys.readouterr().err
    assert not (prepared / "outputs" / "lora" / "train.sh").exists()


def test_unknown_preset_is_usage_error(prepared, capsys):
    with pytest.raises(SystemExit) as exc:
        _gen(prepared, "--vram", "10G")
    assert exc.value.code == 2


def test_missing_dataset(root, capsys):
    assert _gen(root, "--vram", "16G") == 2
    assert "python -m fluxgym prepare lora" in capsys.readouterr().err


def test_options_reach_the_script(prepared, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of t --w 64 --h 64\n")
    assert _gen(prepared, "--vram", "8G", "--epochs", "3", "--save-every", "1", "--rank", "8", "--lr", "1e-4",
                "--seed", "7", "--sample-prompts", str(prompts), "--sample-every", "5", "--resume", "auto",
                "--extra", "--network_alpha", "4") == 0
    out = prepared / "outputs" / "lora"
    sh = (out / "train.sh").read_text()
    for frag in ("--max_train_epochs 3", "--save_every_n_epochs 1", "--network_dim 8", "--learning_rate 1e-4",
                 "--seed 7", "--sample_every_n_steps 5", "--resume auto", "--network_alpha 4",
                 "--max_data_loader_n_workers 1"):
        assert frag in sh
    assert "resolution = 384" in (out / "dataset.toml").read_text()  # the 8G preset's default
    assert "a photo of t --w 64 --h 64" in (out / "sample_prompts.txt").read_text()
    info = json.loads((out / "run.json").read_text())
    assert info["preset"] == "8G" and info["preset_version"] == 1


def test_no_checkpointing_and_no_sampling(root):
    _, res = setup_lora(root, checkpointing=False)
    assert "--save_state" not in res.argv and "--sample_prompts" not in res.argv
    assert "--save_state" not in res.files["train.sh"].read_text().split("\nROOT=")[1]


def test_per_step_augmentation_from_the_advanced_panel_drops_the_latent_cache(root):
    _, plain = setup_lora(root)
    assert "--cache_latents_to_disk" in plain.argv
    _, res = setup_lora(root, extra=("--color_aug",))
    assert "--color_aug" in res.argv and "--cache_latents_to_disk" not in res.argv  # else the trainer exits 2


def test_per_step_caption_options_drop_the_text_cache_and_the_trainer_accepts_the_script(root):
    import tomllib

    from fluxgym.webui.form import TrainerArgumentError, check_with_trainer

    te_cache = {"--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"}
    _, plain = setup_lora(root)
    assert te_cache <= set(plain.argv)
    with pytest.raises(TrainerArgumentError, match="--shuffle_caption changes the caption every step"):
        check_with_trainer(plain.argv + ["--shuffle_caption"])  # what FluxGym's own script would hit
    guide = ("--shuffle_caption", "--caption_dropout_rate", "0.05", "--random_crop")
    _, res = setup_lora(root, extra=guide)
    assert not te_cache & set(res.argv) and "--cache_latents_to_disk" not in res.argv
    check_with_trainer(res.argv)  # the generated command passes the trainer's own checks
    toml = tomllib.loads(res.files["dataset.toml"].read_text(encoding="utf-8"))
    assert toml["general"]["shuffle_caption"] is True  # the file's key wins over the flag: it must agree
    script = res.files["train.sh"].read_text(encoding="utf-8")
    assert "# No text-encoder cache: --shuffle_caption, --caption_dropout_rate change(s)" in script
    assert "# No latent cache: --random_crop" in script
    _, zero = setup_lora(root, extra=("--caption_dropout_rate", "0"))  # a zero rate changes nothing
    assert te_cache <= set(zero.argv) and "No text-encoder cache" not in zero.files["train.sh"].read_text()
