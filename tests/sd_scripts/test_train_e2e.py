"""End to end: the real entry script trains the tiny models, through `accelerate launch`.

Checks what users and downstream tools see: LoRA keys/shapes/metadata as upstream, cache
files named and keyed as upstream, state folders, heartbeat, console markers; a stale
caption re-caches; the saved LoRA loads in diffusers and reproduces our model's output.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors import safe_open

from train_helpers import make_dataset, run_trainer, trainer_args


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    image_dir, toml = make_dataset(root, count=4, size=64)
    out = root / "out"
    args = trainer_args(tiny_models, toml, out, "--max_train_epochs", "2", "--save_every_n_epochs", "1",
                        "--save_state", "--network_alpha", "2")
    proc = run_trainer(args, launcher="accelerate")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "images": image_dir, "toml": toml, "out": out, "proc": proc, "args": args}


def read_lora(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_lora_file_has_upstream_keys_shapes_and_metadata(trained, tiny_models):
    tensors, meta = read_lora(trained["out"] / "tiny.safetensors")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for suffix in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin", "txt_attn_qkv",
                   "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"):
        assert f"lora_unet_double_blocks_0_{suffix}" in names
    for suffix in ("linear1", "linear2", "modulation_lin"):
        assert f"lora_unet_single_blocks_0_{suffix}" in names
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in names)
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == 4 and up.shape[1] == 4
        assert tensors[f"{name}.alpha"].ndim == 0 and float(tensors[f"{name}.alpha"]) == 2.0
    assert len(tensors) == 3 * len(names)
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"].startswith("flux-1-")
    assert meta["ss_steps"] == "8" and meta["ss_epoch"] == "2"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_discrete_flow_shift"] == "3.1582"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["ss_new_sd_model_hash"])
    assert "fluxtrain_data_sha256" in meta
    # upstream's hashes: sshs_model_hash is the sha256 of the tensor data section
    assert meta["sshs_model_hash"] == meta["fluxtrain_data_sha256"]
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])
    assert re.fullmatch(r"[0-9a-f]{8}", meta["ss_sd_model_hash"])
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["images"]["tok"] == 4


def test_epoch_files_state_folders_and_heartbeat(trained):
    out = trained["out"]
    assert (out / "tiny-000001.safetensors").is_file()
    assert not (out / "tiny-000002.safetensors").exists()  # the last epoch is the final file, as upstream
    for state in ("tiny-000001-state", "tiny-state"):
        folder = out / state
        for f in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                  "train_state.json", "checkpoint.json"):
            assert (folder / f).is_file(), f"{state}/{f}"
    assert json.loads((out / "tiny-000001-state" / "train_state.json").read_text()) == {
        "current_epoch": 1, "current_step": 4}
    manifest = json.loads((out / "tiny-state" / "checkpoint.json").read_text())
    assert manifest["step"] == 8 and manifest["epoch"] == 2
    state_keys, _ = read_lora(out / "tiny-state" / "model.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in state_keys)
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["phase"] == "done" and beat["step"] == 8 and beat["total_steps"] == 8


def test_console_markers_like_upstream(trained):
    proc = trained["proc"]
    assert "epoch 1/2" in proc.stdout and "epoch 2/2" in proc.stdout
    assert "steps:" in proc.stderr and "8/8" in proc.stderr
    assert "saving checkpoint:" in proc.stdout and "model saved." in proc.stdout
    assert "caching latents" in proc.stdout


def test_cache_files_named_and_keyed_as_upstream(trained):
    images = trained["images"]
    lat = images / "img00_0064x0064_flux.npz"
    te = images / "img00_flux_te.npz"
    assert lat.is_file() and te.is_file()
    with np.load(lat) as z:
        assert z["latents_8x8"].shape == (16, 8, 8) and z["latents_8x8"].dtype == np.float32
        assert list(z["original_size_8x8"]) == [64, 64]
        assert "crop_ltrb_8x8" in z.files
    with np.load(te) as z:
        for key in ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask"):
            assert key in z.files
        assert z["txt_ids"].shape[-1] == 3 and not z["txt_ids"].any()


def test_stale_caption_is_recached(trained, tiny_models):
    images, out = trained["images"], trained["root"] / "out2"
    te = images / "img01_flux_te.npz"
    with np.load(te) as z:
        before = z["t5_out"].copy()
    (images / "img01.txt").write_text("tok, a completely different caption now", encoding="utf-8")
    args = trainer_args(tiny_models, trained["toml"], out, "--max_train_steps", "1")
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img01_flux_te.npz" in proc.stderr + proc.stdout  # the warning names the stale file
    with np.load(te) as z:
        assert not np.array_equal(z["t5_out"], before)


def test_trained_lora_loads_in_diffusers_and_reproduces_our_output(trained, tiny_models, tmp_path):
    """diffusers' kohya converter hard-codes width 3072 for single-block linear1, so the tiny model
    trains double blocks only here; tests/sd_scripts/test_lora_flux.py covers every layer at real width."""
    import torch
    from diffusers import FluxPipeline

    from library.flux_loading import load_flow_model
    from library.flux_packing import image_ids
    from networks import lora_flux

    out = tmp_path / "o"
    args = trainer_args(tiny_models, trained["toml"], out, "--max_train_steps", "3", "--network_train_unet_only",
                        "--network_args", "train_blocks=double", "--network_alpha", "4")
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora_file = out / "tiny.safetensors"

    ours = load_flow_model(str(tiny_models["unet"]), dtype=torch.float32)
    network, _ = lora_flux.create_network_from_weights(1.0, str(lora_file), None, [None, None], ours)
    network.apply_to([None, None], ours, apply_text_encoder=False, apply_unet=True)
    theirs = load_flow_model(str(tiny_models["unet"]), dtype=torch.float32)
    state, alphas = FluxPipeline.lora_state_dict(str(lora_file), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=theirs)

    cfg = ours.config
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.5]), img_ids=image_ids(8, 8), txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([1.0]) if cfg.guidance_embeds else None, return_dict=False)
    with torch.no_grad():
        a, b = ours(**inputs)[0], theirs(**inputs)[0]
    base = load_flow_model(str(tiny_models["unet"]), dtype=torch.float32)
    with torch.no_grad():
        plain = base(**inputs)[0]
    assert (a - plain).abs().max() > 1e-4  # the trained LoRA changes the output
    assert (a - b).abs().max() <= 1e-5


def test_low_vram_combination_trains(trained, tiny_models, tmp_path):
    """FluxGym's 12G shape on CPU: fp8 base + bf16 compute + block swap + gradient checkpointing +
    single blocks only, with TE outputs cached and CLIP-L LoRA trained live."""
    out = tmp_path / "o"
    args = trainer_args(tiny_models, trained["toml"], out, "--max_train_steps", "2", "--fp8_base",
                        "--gradient_checkpointing", "--blocks_to_swap", "2", "--network_args", "train_blocks=single",
                        "--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False",
                        "scale_parameter=False", "warmup_init=False", "--lr_scheduler", "constant_with_warmup",
                        "--max_grad_norm", "0.0")
    args[args.index("--mixed_precision") + 1] = "bf16"
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "enable block swap: blocks_to_swap=2" in proc.stdout
    tensors, meta = read_lora(out / "tiny.safetensors")
    assert meta["ss_fp8_base"] == "True" and meta["ss_mixed_precision"] == "bf16"
    assert not any("double_blocks" in k for k in tensors)
    ups = [v for k, v in tensors.items() if "single_blocks" in k and k.endswith("lora_up.weight")]
    assert ups and any(u.abs().sum() > 0 for u in ups)  # the swapped, checkpointed blocks were trained


def test_samples_at_first_and_per_epoch_with_upstream_names(trained, tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\ntok, a red ball --w 32 --h 32 --s 2 --d 5\ntok, a cube --w 96 --h 64 --s 2\n")
    out = tmp_path / "o"
    args = trainer_args(tiny_models, trained["toml"], out, "--max_train_epochs", "1", "--sample_prompts",
                        str(prompts), "--sample_at_first", "--sample_every_n_epochs", "1")
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert len(names) == 4, names
    assert re.fullmatch(r"tiny_000000_00_\d{14}_5\.png", names[0]) and re.fullmatch(r"tiny_000000_01_\d{14}\.png",
                                                                                     names[1])
    assert re.fullmatch(r"tiny_e000001_00_\d{14}_5\.png", names[2])
    from PIL import Image

    assert Image.open(out / "sample" / names[3]).size == (96, 64)
