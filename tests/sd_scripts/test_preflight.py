"""Bad input fails in the preflight: before any model loads, within seconds, with the flag or file named.

Each case runs the real entry point (`flux_train_network.main`) in-process on the tiny models. Loading a
model is made to fail loudly, so a case that got past the preflight cannot pass; no cache file or
heartbeat may be written; the error arrives within the 10 s the issue asks for.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from train_helpers import make_dataset, trainer_args

BOUND_S = 10.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    image_dir, toml = make_dataset(root, count=2, size=64)
    return root, image_dir, toml


@pytest.fixture
def no_model_loads(monkeypatch):
    from library import flux_loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the preflight refused the input")

    for name in ("load_flow_model", "load_clip_l", "load_t5xxl", "load_ae", "analyze_flux_checkpoint"):
        monkeypatch.setattr(flux_loading, name, refuse)


def run_main(args: list[str]) -> tuple[int, float]:
    import flux_train_network

    started = time.monotonic()
    code = flux_train_network.main(args)
    return code, time.monotonic() - started


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def truncated_copy(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dest


def fake_state(folder: Path, network_dim: int, *, run_id: int = 1, step: int = 2) -> Path:
    """A complete state folder (as our manifest defines it) written by a run with another --network_dim."""
    from library import atomic_io

    settings = {"network_module": "networks.lora_flux", "network_dim": network_dim, "network_alpha": 1.0,
                "train_blocks": "all", "network_train_unet_only": False, "optimizer_type": "adamw"}
    with atomic_io.atomic_dir(folder) as stage:
        stage.write_bytes("model.safetensors", b"x" * 16)
        stage.write_bytes("optimizer.bin", b"y" * 16)
        stage.write_json("train_state.json", {"current_epoch": 1, "current_step": step})
        stage.set_manifest({"format": "fluxtrain-checkpoint", "version": 1, "kind": "state", "output_name": "tiny",
                            "step": step, "epoch": 1, "data_position": {"epoch": 1, "batch_in_epoch": 0},
                            "resume_settings": settings, "run_id": run_id})
    return folder


CASES = {
    # name: (how to change the arguments, exit code, words the message must contain)
    "network_dim_0": (lambda a, t: with_flag(a, "--network_dim", "0"), 2, ["--network_dim 0", "at least 1"]),
    "negative_learning_rate": (lambda a, t: with_flag(a, "--learning_rate", "-1"), 2, ["--learning_rate -1"]),
    "negative_max_train_steps": (lambda a, t: with_flag(a, "--max_train_steps", "-5"), 2, ["--max_train_steps -5"]),
    "zero_epochs": (lambda a, t: with_flag(a, "--max_train_epochs", "0"), 2, ["--max_train_epochs 0"]),
    "negative_cadence": (lambda a, t: with_flag(a, "--save_every_n_steps", "-1"), 2, ["--save_every_n_steps -1"]),
    "missing_ae": (lambda a, t: with_flag(a, "--ae", str(t / "nowhere" / "ae.sft")), 2, ["--ae", "not found"]),
    "truncated_clip_l": (lambda a, t: with_flag(a, "--clip_l", str(truncated_copy(
        Path(a[a.index("--clip_l") + 1]), t / "clip_l.safetensors"))), 2, ["--clip_l", "truncated"]),
    "diffusers_folder_without_config": (lambda a, t: with_flag(a, "--pretrained_model_name_or_path", str(
        _folder_with_weights(Path(a[a.index("--pretrained_model_name_or_path") + 1]), t / "dit"))), 2,
        ["--pretrained_model_name_or_path", "config.json"]),
    "missing_dataset_config": (lambda a, t: with_flag(a, "--dataset_config", str(t / "no.toml")), 2,
                               ["--dataset_config", "not found"]),
    "resume_not_a_state_folder": (lambda a, t: with_flag(a, "--resume", str(t / "tiny.safetensors")), 2,
                                  ["--resume", "not a state folder"]),
    "resume_with_another_network_dim": (lambda a, t: with_flag(a, "--resume", str(fake_state(
        t / "out" / "tiny-000001-state", 8))), 2, ["network_dim", "checkpoint has 8", "this run has 4"]),
    "network_weights_of_the_run_being_moved": (lambda a, t: with_flag(a, "--network_weights", str(
        _previous_lora(Path(a[a.index("--clip_l") + 1]), t / "out"))), 2, ["--network_weights", "runs/<id>/"]),
}


def _previous_lora(any_safetensors: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny.safetensors").write_bytes(any_safetensors.read_bytes())
    return out / "tiny.safetensors"


def _folder_with_weights(src: Path, folder: Path) -> Path:
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(src.read_bytes())
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_models_load(case, tiny_models, data, tmp_path, capsys, no_model_loads):
    root, image_dir, toml = data
    change, code, words = CASES[case]
    out = tmp_path / "out"
    args = change(trainer_args(tiny_models, toml, out, "--max_train_steps", "2"), tmp_path)
    got, elapsed = run_main(args)
    err = capsys.readouterr().err
    assert got == code, err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    for word in words:
        assert word in line, line
    assert elapsed < BOUND_S
    assert not list(image_dir.glob("*.npz")), "caches were written before the error"
    assert not (out / "heartbeat.json").exists()


def test_read_only_output_folder_fails_in_preflight(tiny_models, data, tmp_path, capsys, no_model_loads):
    _, _, toml = data
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root ignores permission bits: take a folder no one can create files in
        out = Path("/sys/kernel")
    try:
        got, elapsed = run_main(trainer_args(tiny_models, toml, out, "--max_train_steps", "2"))
    finally:
        (tmp_path / "ro").chmod(0o755)
    err = capsys.readouterr().err
    assert got in (2, 5) and f"--output_dir {out}" in err, err
    assert elapsed < BOUND_S


def test_no_room_for_a_checkpoint_fails_in_preflight(tiny_models, data, tmp_path, capsys, no_model_loads,
                                                     monkeypatch):
    import shutil

    from library import preflight

    _, _, toml = data
    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    got, _ = run_main(trainer_args(tiny_models, toml, tmp_path / "out", "--max_train_steps", "2", "--save_state"))
    err = capsys.readouterr().err
    assert got == 5 and "MB free" in err and "--output_dir" in err, err


def test_checkpoint_size_estimate_counts_the_lora_and_optimizer(tiny_models, data, tmp_path):
    """The estimate grows with the rank and with a state folder (weights + AdamW moments)."""
    import flux_train_network
    from library.preflight import checkpoint_bytes
    from library.settings import settings_from_args

    _, _, toml = data

    def estimate(*extra):
        ns = flux_train_network.setup_parser().parse_args(trainer_args(tiny_models, toml, tmp_path, *extra))
        return checkpoint_bytes(settings_from_args(ns))

    base = estimate()
    assert estimate("--network_dim", "8") > base
    with_state = estimate("--save_state")
    lora_only = base - 2**20
    assert with_state - 2**20 == pytest.approx(lora_only * 4, rel=0.01)  # 4 B LoRA + 4 B weights + 8 B AdamW


def test_user_errors_map_to_the_exit_codes_of_errors_py():
    """Every exit code main() can return for a user error is one errors.py defines."""
    from library import errors

    codes = {errors.BadFlagError.exit_code, errors.BadFileError.exit_code, errors.ResumeError.exit_code,
             errors.FolderInUseError.exit_code, errors.DiskError.exit_code}
    assert codes == {errors.EXIT_BAD_INPUT, errors.EXIT_FOLDER_IN_USE, errors.EXIT_DISK}
    for cls_path in ("library.settings.SettingsError", "library.flux_loading.ModelFileError",
                     "library.checkpoint_io.ResumeMismatchError", "library.checkpoint_io.CheckpointLoadError",
                     "library.dataset_config.DatasetConfigError", "library.flux_tokenizers.TokenizerNotFoundError",
                     "networks.lora_flux.LoRAWeightsError", "library.sampling.SamplePromptError",
                     "library.dataset.DatasetError", "library.config_file.ConfigFileError",
                     "library.flux_convert.ConversionError"):
        module, name = cls_path.rsplit(".", 1)
        cls = getattr(__import__(module, fromlist=[name]), name)
        assert issubclass(cls, errors.UserError) and cls.exit_code == errors.EXIT_BAD_INPUT, cls_path
    assert errors.exit_code_for(KeyboardInterrupt()) == errors.EXIT_INTERRUPTED
