"""The trainer's command line: FluxGym's generated flags parse, unsupported upstream flags fail loudly."""
from __future__ import annotations

import subprocess
import sys

import pytest

import flux_train_network
from library.config_file import ConfigFileError, read_config_values
from library.settings import SettingsError, settings_from_args

COMMON = [
    "--pretrained_model_name_or_path", "/m/unet/flux1-dev.sft", "--clip_l", "/m/clip/clip_l.safetensors",
    "--t5xxl", "/m/clip/t5xxl_fp16.safetensors", "--ae", "/m/vae/ae.sft", "--cache_latents_to_disk",
    "--save_model_as", "safetensors", "--sdpa", "--persistent_data_loader_workers",
    "--max_data_loader_n_workers", "2", "--seed", "42", "--gradient_checkpointing", "--mixed_precision", "bf16",
    "--save_precision", "bf16", "--network_module", "networks.lora_flux", "--network_dim", "4",
]
PRESETS = {
    "20G": ["--optimizer_type", "adamw8bit"],
    "16G": ["--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
            "warmup_init=False", "--lr_scheduler", "constant_with_warmup", "--max_grad_norm", "0.0"],
    "12G": ["--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
            "warmup_init=False", "--split_mode", "--network_args", "train_blocks=single",
            "--lr_scheduler", "constant_with_warmup", "--max_grad_norm", "0.0"],
}
TAIL = [
    "--sample_prompts=/o/x/sample_prompts.txt", "--sample_every_n_steps=100", "--learning_rate", "8e-4",
    "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--fp8_base", "--highvram",
    "--max_train_epochs", "16", "--save_every_n_epochs", "4", "--dataset_config", "/o/x/dataset.toml",
    "--output_dir", "/o/x", "--output_name", "x", "--timestep_sampling", "shift", "--discrete_flow_shift",
    "3.1582", "--model_prediction_type", "raw", "--guidance_scale", "1.0", "--loss_type", "l2",
]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fluxgym_preset_parses_into_settings(preset, tmp_path):
    argv = COMMON + PRESETS[preset] + TAIL
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 512\n")
    argv = [a.replace("/o/x/sample_prompts.txt", str(prompts)) for a in argv]
    ns = flux_train_network.setup_parser().parse_args(argv)
    settings = settings_from_args(ns)
    assert settings.model.fp8_base is True
    assert settings.data.cache_text_encoder_outputs_to_disk is True
    assert settings.run.max_train_epochs == 16
    assert settings.flow.discrete_flow_shift == pytest.approx(3.1582)
    if preset == "12G":
        assert settings.run.blocks_to_swap == 18  # --split_mode is the deprecated alias, as upstream
        assert settings.network.train_blocks == "single"
    if preset != "20G":
        assert settings.optimizer.args == {"relative_step": False, "scale_parameter": False, "warmup_init": False}
        assert settings.optimizer.max_grad_norm == 0.0


def test_extra_flags_from_the_issue_parse(tmp_path):
    extra = ["--network_alpha", "16", "--network_train_unet_only", "--network_weights", "w.safetensors",
             "--train_batch_size", "2", "--max_train_steps", "10", "--save_every_n_steps", "5",
             "--lr_warmup_steps", "0.1", "--t5xxl_max_token_length", "256", "--apply_t5_attn_mask",
             "--weighting_scheme", "logit_normal", "--sigmoid_scale", "1.5", "--tokenizer_cache_dir", "tok",
             "--sample_every_n_epochs", "1", "--sample_at_first", "--blocks_to_swap", "4", "--split_mode",
             "--resume", "auto", "--dataloader_timeout", "5", "--ddp_timeout", "3"]
    ns = flux_train_network.setup_parser().parse_args(COMMON + ["--dataset_config", "d.toml", "--output_dir",
                                                                str(tmp_path)] + extra)
    s = settings_from_args(ns)
    assert (s.network.alpha, s.network.train_unet_only, s.run.blocks_to_swap) == (16.0, True, 4)
    assert s.optimizer.warmup_steps == pytest.approx(0.1)
    assert s.guards.dataloader_timeout == 5 and s.guards.ddp_timeout_minutes == 3
    assert s.save.resume == "auto"


@pytest.mark.parametrize("flag, reason", [("--v2", "SD1/SDXL only"), ("--min_snr_gamma", "SD1/SDXL noise"),
                                          ("--deepspeed", "DeepSpeed/ZeRO"),
                                          ("--token_warmup_step", "token warmup")])
def test_unsupported_upstream_flag_exits_2_naming_it_and_why(flag, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        flux_train_network.setup_parser().parse_args(COMMON + [flag, "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"not supported by this trainer: {flag} (" in err and reason in err


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        flux_train_network.setup_parser().parse_args(COMMON + ["--no_such_flag"])
    assert exc.value.code == 2


def test_unsupported_flag_in_a_real_subprocess(repo_root):
    script = repo_root / "sd-scripts" / "flux_train_network.py"
    proc = subprocess.run([sys.executable, str(script), "--v2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not supported by this trainer: --v2 (SD1/SDXL only" in proc.stderr


def test_config_file_values_and_unknown_key(tmp_path):
    parser = flux_train_network.setup_parser()
    good = tmp_path / "good.toml"
    good.write_text('[model]\nnetwork_dim = 8\n[train]\nlearning_rate = 0.001\n')
    assert read_config_values(parser, str(good)) == {"network_dim": 8, "learning_rate": 0.001}
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlerning_rate = 0.001\n')
    with pytest.raises(ConfigFileError, match="unknown key `lerning_rate`.*bad.toml|bad.toml.*lerning_rate"):
        read_config_values(parser, str(bad))
    unsupported = tmp_path / "unsup.toml"
    unsupported.write_text("v2 = true\n")
    with pytest.raises(ConfigFileError, match="not supported by this trainer: --v2 .SD1/SDXL only"):
        read_config_values(parser, str(unsupported))


def test_config_file_is_overridden_by_command_line(tmp_path):
    from library.config_file import parse_with_config_file

    cfg = tmp_path / "c.toml"
    cfg.write_text("network_dim = 8\nlearning_rate = 0.5\n")
    ns = parse_with_config_file(flux_train_network.setup_parser(), COMMON + ["--config_file", str(cfg)])
    assert ns.network_dim == 4  # COMMON passes --network_dim 4 explicitly
    assert ns.learning_rate == 0.5


def test_bad_combinations_name_the_flag(tmp_path):
    parser = flux_train_network.setup_parser()
    base = COMMON + ["--dataset_config", "d.toml", "--output_dir", str(tmp_path)]
    cases = {
        "--fp8_base": ["--fp8_base", "--mixed_precision", "no"],
        "--network_module": ["--network_module", "networks.lora"],
        "--gradient_accumulation_steps": ["--gradient_accumulation_steps", "4"],
    }
    for flag, extra in cases.items():
        with pytest.raises(SettingsError, match=flag):
            settings_from_args(parser.parse_args(base + extra))
    missing = [a for a in COMMON if a not in ("--ae", "/m/vae/ae.sft")]
    with pytest.raises(SettingsError, match="--ae"):
        settings_from_args(parser.parse_args(missing + ["--dataset_config", "d", "--output_dir", str(tmp_path)]))


def test_fluxgym_introspection_functions_exist():
    import train_network
    from library.flux_train_utils import add_flux_train_arguments

    parser = train_network.setup_parser()
    add_flux_train_arguments(parser)
    dests = {a.dest for a in parser._actions}
    assert {"network_dim", "learning_rate", "timestep_sampling", "guidance_scale", "clip_l"} <= dests
    assert "blocks_to_swap" not in dests  # as upstream: FluxGym's panel does not see the DiT group


def test_output_config_writes_non_defaults_and_never_overwrites(tmp_path):
    target = tmp_path / "mine.toml"
    assert flux_train_network.main(COMMON + ["--config_file", str(target), "--output_config",
                                             "--max_train_steps", "5"]) == 0
    import tomllib

    values = tomllib.loads(target.read_text())
    assert values["max_train_steps"] == 5 and values["network_dim"] == 4 and "learning_rate" not in values
    before = target.read_bytes()
    assert flux_train_network.main(["--config_file", str(target), "--output_config"]) == 1
    assert target.read_bytes() == before


@pytest.mark.parametrize("extra, flag", [
    (["--optimizer_type", "prodigy"], "--optimizer_type"),
    (["--lr_scheduler", "piecewise_constant"], "--lr_scheduler"),
    (["--lr_scheduler", "adafactor"], "--lr_scheduler adafactor"),
    (["--network_args", "train_blocks=singel"], "--network_args"),
    (["--network_args", "split_qkv=True"], "split_qkv"),
])
def test_bad_values_fail_before_any_model_loads(extra, flag, tmp_path):
    ns = flux_train_network.setup_parser().parse_args(
        COMMON + ["--dataset_config", "d.toml", "--output_dir", str(tmp_path)] + extra)
    with pytest.raises(SettingsError, match=flag):
        settings_from_args(ns)
