"""The tiny model trained with a realistic flag set from a FLUX LoRA guide, and resumed bit-identically.

Flags: TensorBoard logging, validation split, full bf16, caption shuffle and dropout, network/rank/module dropout,
noise offset with adaptive scale, multires (pyramid) noise, ip noise gamma, a timestep range, Huber loss on the
exponential schedule, cosine with restarts, weight-norm scaling, a regularisation subset with --prior_loss_weight,
an alpha-masked subset with --masked_loss, and a Hub repository while offline. The run interrupted after step 2 and resumed must log the same per-step
losses and end with the same LoRA tensors as the uninterrupted one: caption processing, dropout masks and noise
all depend only on (seed, step/epoch, item).
"""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from train_helpers import make_dataset, run_trainer, trainer_args

STEPS = 4
GUIDE_FLAGS = [
    "--max_train_steps", str(STEPS), "--t5xxl_max_token_length", "16",
    "--mixed_precision", "bf16", "--full_bf16", "--logging_dir", "LOGS", "--validation_split", "0.25",
    "--validate_every_n_steps", "2",
    "--shuffle_caption", "--keep_tokens", "1", "--caption_dropout_rate", "0.3", "--caption_tag_dropout_rate", "0.2",
    "--network_dropout", "0.1", "--network_args", "rank_dropout=0.1", "module_dropout=0.1",
    "--noise_offset", "0.05", "--noise_offset_random_strength", "--ip_noise_gamma", "0.05",
    "--adaptive_noise_scale", "0.01", "--multires_noise_iterations", "3", "--multires_noise_discount", "0.4",
    "--min_timestep", "50", "--max_timestep", "950",
    "--loss_type", "huber", "--huber_schedule", "exponential", "--huber_c", "0.2",
    "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2",
    "--scale_weight_norms", "0.002", "--prior_loss_weight", "0.5", "--masked_loss",
    "--huggingface_repo_id", "me/tiny-lora",
]


def _dataset(root):
    image_dir, _ = make_dataset(root, count=4, size=64)
    rgba = np.array(Image.open(image_dir / "img00.png").convert("RGBA"))
    rgba[:, 32:, 3] = 0  # right half masked out of the loss
    Image.fromarray(rgba, "RGBA").save(image_dir / "img00.png")
    reg = root / "reg"
    reg.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30 * i, 120, 200)).save(reg / f"r{i}.png")
    toml = root / "guide.toml"
    toml.write_text(
        f"[general]\ncaption_extension = '.txt'\n\n[[datasets]]\nresolution = 64\nbatch_size = 1\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{image_dir}'\n  class_tokens = 'tok'\n  alpha_mask = true\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{reg}'\n  class_tokens = 'person'\n  is_reg = true\n",
        encoding="utf-8")
    return toml


def _args(models, toml, out, *extra):
    args = trainer_args(models, toml, out, *[a.replace("LOGS", str(out / "logs")) for a in GUIDE_FLAGS], *extra)
    for flag in ("--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"):
        args.remove(flag)  # shuffled/dropped captions are encoded every step (cached outputs are refused)
    args[args.index("--mixed_precision") + 1] = "bf16"
    return args


def _run(args, loss_log, stop=None):
    env = {"FLUXTRAIN_LOSS_LOG": str(loss_log)}
    if stop is not None:
        env["FLUXTRAIN_EXIT_AFTER_STEP"] = str(stop)
    proc = run_trainer(args, env=env, timeout=600)
    print(proc.stdout, proc.stderr[-3000:])  # shown when an assertion below fails
    assert proc.returncode == (75 if stop is not None else 0), proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_guide_flag_set_trains_and_resumes_bit_identically(tiny_models, tmp_path):
    toml = _dataset(tmp_path)
    base = tmp_path / "base"
    proc = _run(_args(tiny_models, toml, base), tmp_path / "base.csv")
    out = proc.stdout
    assert "Hugging Face Hub cannot be reached" in out and out.index("cannot be reached") < out.index(
        "running training")  # the offline preflight speaks before training
    assert "num train images * repeats: 3" in out  # 4 images, 1 held out for validation; reg images not counted
    assert "validation loss at step" in out and "enable full bf16 training." in out
    assert "Keys Scaled=" in proc.stderr and "Average key norm=" in proc.stderr  # upstream's bar figures
    assert list((base / "logs").rglob("events.out.tfevents.*"))
    tensors = load_file(str(base / "tiny.safetensors"))
    with safe_open(str(base / "tiny.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_noise_offset"], meta["ss_network_dropout"], meta["ss_huber_schedule"],
            meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("0.05", "0.1", "exponential", "2", "0.5")
    assert (meta["ss_adaptive_noise_scale"], meta["ss_multires_noise_iterations"],
            meta["ss_multires_noise_discount"]) == ("0.01", "3", "0.4")
    subsets = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert [(s["shuffle_caption"], s["is_reg"], s["alpha_mask"]) for s in subsets] == [(True, False, True),
                                                                                       (True, True, False)]
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if "lora_" in k and k.endswith("weight"))
    ups = [t.float() for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert any(float(u.abs().max()) > 0 for u in ups)  # it trained

    chain = tmp_path / "chain"
    args = _args(tiny_models, toml, chain, "--save_every_n_steps", "2", "--save_state")  # step 2: state
    _run(args, tmp_path / "chain.csv", stop=2)
    resumed = _run(args + ["--resume", "auto"], tmp_path / "chain.csv")
    assert "resumed from" in resumed.stdout
    assert (tmp_path / "chain.csv").read_text().splitlines() == (tmp_path / "base.csv").read_text().splitlines()
    again = load_file(str(chain / "tiny.safetensors"))
    assert again.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(again[key], tensors[key]), key


def test_network_train_text_encoder_only_trains_the_clip_lora_alone(tiny_models, tmp_path):
    """As upstream: the transformer LoRA modules are dropped, so the saved file holds lora_te1_ keys only, and
    those were trained (their up weights start at zero); with --network_train_unet_only it is an error."""
    from train_helpers import run_trainer_in_process

    _, toml = make_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    rc = run_trainer_in_process(trainer_args(tiny_models, toml, out, "--max_train_steps", "2",
                                             "--network_train_text_encoder_only"))
    assert rc == 0
    tensors = load_file(str(out / "tiny.safetensors"))
    assert tensors and all(key.startswith("lora_te1_") for key in tensors)
    ups = [t for key, t in tensors.items() if key.endswith("lora_up.weight")]
    assert ups and all(float(t.abs().max()) > 0 for t in ups)  # every CLIP-L module moved from its zero init

    import flux_train_network
    from library.settings import SettingsError, settings_from_args

    ns = flux_train_network.setup_parser().parse_args(trainer_args(
        tiny_models, toml, out, "--network_train_text_encoder_only", "--network_train_unet_only"))
    with pytest.raises(SettingsError, match="--network_train_unet_only and --network_train_text_encoder_only"):
        settings_from_args(ns)
