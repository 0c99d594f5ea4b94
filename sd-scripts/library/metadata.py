"""`ss_*` and `modelspec.*` metadata for saved LoRA files, with upstream's keys.

Every value is a string, as upstream writes them; FluxGym, ComfyUI and civitai read these
keys to show how a LoRA was trained. Built once per run, then updated per save.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

from library.atomic_io import sha256_file

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def _git_commit(repo_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "(unknown)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


class ModelHasher:
    """sha256 of the base model file, computed on a background thread.

    Upstream hashes the whole base checkpoint (about 24 GB) in the foreground, a silent
    phase that looks like a hang; we overlap it with caching and training instead.
    """

    def __init__(self, path: str):
        self.path = path
        self.value: str | None = None
        self.legacy = legacy_file_hash(path) if os.path.isfile(path) else None  # ss_sd_model_hash
        if os.path.isfile(path):
            threading.Thread(target=self._run, name="model-hash", daemon=True).start()

    def _run(self) -> None:
        self.value = sha256_file(self.path)


def legacy_file_hash(path: str) -> str:
    """The old 8-hex model hash (A1111/kohya): sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def dataset_statistics(items) -> dict[str, str]:
    """ss_tag_frequency and ss_dataset_dirs: per image folder, caption tag counts and image/repeat counts."""
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        folder = Path(item.image_path).parent.name
        entry = dirs.setdefault(folder, {"n_repeats": item.num_repeats, "img_count": 0})
        entry["img_count"] += 1
        counts = tags.setdefault(folder, {})
        for tag in (t.strip() for t in item.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs)}


def _str(value) -> str:
    return "None" if value is None else str(value)


def build_training_metadata(settings, *, optimizer_name: str, num_train_images: int, num_batches_per_epoch: int,
                            num_epochs: int, max_train_steps: int, is_schnell: bool, datasets: list[dict],
                            repo_dir: Path, items=(), legacy_model_hash: str | None = None) -> dict[str, str]:
    net, opt, flow, run = settings.network, settings.optimizer, settings.flow, settings.run
    raw = settings.raw
    meta = {
        "ss_session_id": str(uuid.uuid4().int % (1 << 32)),
        "ss_training_started_at": str(time.time()),
        "ss_output_name": settings.save.output_name,
        "ss_learning_rate": _str(opt.learning_rate),
        "ss_text_encoder_lr": _str(opt.text_encoder_lr),
        "ss_unet_lr": _str(opt.unet_lr),
        "ss_num_train_images": str(num_train_images),
        "ss_num_reg_images": "0",
        "ss_num_validation_images": "0",
        "ss_num_batches_per_epoch": str(num_batches_per_epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_gradient_checkpointing": str(run.gradient_checkpointing),
        "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": str(max_train_steps),
        "ss_lr_warmup_steps": _str(opt.warmup_steps),
        "ss_lr_scheduler": opt.scheduler,
        "ss_network_module": net.module,
        "ss_network_dim": str(net.dim),
        "ss_network_alpha": _str(raw.get("network_alpha", net.alpha)),
        "ss_network_dropout": "None",
        "ss_mixed_precision": run.mixed_precision,
        "ss_full_fp16": str(settings.precision.full_fp16),
        "ss_v2": "False",
        "ss_base_model_version": "flux1",
        "ss_clip_skip": "None",
        "ss_max_token_length": "None",
        "ss_cache_latents": "True",
        "ss_seed": str(run.seed),
        "ss_lowram": str(bool(raw.get("lowram"))),
        "ss_noise_offset": "None",
        "ss_min_snr_gamma": "None",
        "ss_training_comment": _str(settings.save.training_comment),
        "ss_sd_scripts_commit_hash": _git_commit(repo_dir),
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": str(opt.max_grad_norm),
        "ss_fp8_base": str(settings.model.fp8_base),
        "ss_fp8_base_unet": str(settings.model.fp8_base_unet),
        "ss_loss_type": flow.loss_type,
        "ss_sd_model_name": os.path.basename(settings.model.dit_path),
        "ss_datasets": json.dumps(datasets),
        # FLUX-specific keys (upstream's update_metadata)
        "ss_model_type": "flux",
        "ss_apply_t5_attn_mask": str(settings.model.apply_t5_attn_mask),
        "ss_weighting_scheme": flow.weighting_scheme,
        "ss_logit_mean": str(flow.logit_mean),
        "ss_logit_std": str(flow.logit_std),
        "ss_mode_scale": str(flow.mode_scale),
        "ss_guidance_scale": str(flow.guidance_scale),
        "ss_timestep_sampling": flow.timestep_sampling,
        "ss_sigmoid_scale": str(flow.sigmoid_scale),
        "ss_model_prediction_type": flow.model_prediction_type,
        "ss_discrete_flow_shift": str(flow.discrete_flow_shift),
        "ss_bypass_flux_guidance": str(flow.bypass_guidance),  # the name LoRA metadata viewers show
    }
    if net.args:
        meta["ss_network_args"] = json.dumps(net.args)
    if legacy_model_hash:
        meta["ss_sd_model_hash"] = legacy_model_hash
    meta.update(dataset_statistics(items))
    meta.update(option_metadata(settings, items))
    meta.update(_modelspec(settings, is_schnell))
    return meta


def option_metadata(settings, items=()) -> dict[str, str]:
    """Upstream's ss_* keys for the caption, noise, Huber, dropout and data flags (as str(value), like upstream;
    ss_huber_schedule is the schedule actually used)."""
    raw, flow = settings.raw, settings.flow
    keys = ("network_dropout", "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
            "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
            "ip_noise_gamma_random_strength", "caption_dropout_rate", "caption_dropout_every_n_epochs",
            "caption_tag_dropout_rate", "prior_loss_weight", "scale_weight_norms", "huber_c", "huber_scale",
            "resize_interpolation", "min_timestep", "max_timestep")
    meta = {f"ss_{key}": _str(raw.get(key)) for key in keys if key in raw}
    meta["ss_huber_schedule"] = getattr(flow, "huber_schedule", "constant")
    fallbacks = settings.data.cli_fallbacks  # the flags' values, as upstream writes args.* (tuple as str)
    meta["ss_face_crop_aug_range"] = _str(fallbacks.get("face_crop_aug_range"))
    for key in ("color_aug", "flip_aug", "random_crop"):
        meta[f"ss_{key}"] = str(bool(fallbacks.get(key)))
    from library.image_augment import needs_live_images

    if needs_live_images(items, cache_flag=settings.data.latent_cache_flag):
        meta["ss_cache_latents"] = "False"  # per-step augmentation: encoded every step (library.image_augment)
    meta["ss_num_reg_images"] = str(sum(1 for item in items if getattr(item, "is_reg", False)))
    if raw.get("dataset_class"):  # our key: upstream records no dataset class
        meta["fluxtrain_dataset_class"] = str(raw["dataset_class"])
    return meta


def _modelspec(settings, is_schnell: bool) -> dict[str, str]:
    res = settings.data.cli_fallbacks.get("resolution")
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "flux-1-schnell/lora" if is_schnell else "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": settings.save.metadata.get("title") or settings.save.output_name,
        "modelspec.date": _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{res[0]}x{res[1]}" if res else "1024x1024",
    }
    for key in ("author", "description", "license", "tags"):
        if settings.save.metadata.get(key):
            spec[f"modelspec.{key}"] = settings.save.metadata[key]
    return spec


def metadata_for_save(base: dict[str, str], *, step: int, epoch: int, model_hash: str | None,
                      minimal: bool) -> dict[str, str]:
    meta = dict(base)
    meta["ss_steps"] = str(step)
    meta["ss_epoch"] = str(epoch)
    meta["ss_training_finished_at"] = str(time.time())
    if model_hash:
        meta["ss_new_sd_model_hash"] = model_hash
    if minimal:
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    return meta


def subset_options(sub) -> dict:
    """The caption/data options upstream lists per subset in ss_datasets."""
    opts = sub.caption_options
    return {"shuffle_caption": opts.shuffle_caption, "keep_tokens": opts.keep_tokens,
            "keep_tokens_separator": opts.keep_tokens_separator, "secondary_separator": opts.secondary_separator,
            "enable_wildcard": opts.enable_wildcard, "is_reg": sub.is_reg, "alpha_mask": sub.alpha_mask,
            "resize_interpolation": sub.resize_interpolation, "color_aug": sub.augment.color_aug,
            "flip_aug": sub.flip_aug, "random_crop": sub.augment.random_crop}
