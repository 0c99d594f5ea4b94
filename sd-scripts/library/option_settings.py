"""Checks and typed settings for the caption, regularisation, data, Hub and model-type flags (issue 14, part B).

`settings.settings_from_args` calls these once; every bad value raises SettingsError naming the flag, before
any model loads. Caption and data flags become dataset fallbacks (a dataset.toml key of the same name wins,
as upstream); the Hub preflight decides here whether uploads can happen and says so before training.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import threading

from library.cache_rules import PER_STEP_CAPTION_OPTIONS, PER_STEP_IMAGE_OPTIONS, latent_cache_flag, text_cache_flag
from library.settings import HubSettings, RegularisationSettings, SettingsError

log = logging.getLogger(__name__)
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_SECONDS = 3.0


def _rate(ns: argparse.Namespace, name: str, *, upper_open: bool = False) -> float:
    value = getattr(ns, name)
    if value is None:
        return 0.0
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        bound = "below 1" if upper_open else "at most 1"
        raise SettingsError(f"--{name} {value}: must be at least 0 and {bound}")
    return float(value)


def _non_negative(ns: argparse.Namespace, name: str) -> float:
    value = getattr(ns, name)
    if value is not None and value < 0:
        raise SettingsError(f"--{name} {value}: must be 0 or more")
    return float(value or 0.0)


def check_model_type(ns: argparse.Namespace) -> None:
    """--model_type: upstream's flux/chroma switch. Only flux can be trained here."""
    if ns.model_type == "chroma":
        raise SettingsError("--model_type chroma: Chroma checkpoints are not supported by this trainer (it trains "
                            "LoRAs for FLUX.1 dev/schnell and their fine-tunes, and cannot load Chroma's model). "
                            "Train Chroma LoRAs with upstream sd-scripts' flux_train_network.py --model_type chroma "
                            "--apply_t5_attn_mask; for a FLUX.1 model leave --model_type out (default flux)")


def dataset_fallbacks(ns: argparse.Namespace) -> dict:
    """Command-line values for dataset keys (used where dataset.toml does not set the key)."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        _rate(ns, name)
    if ns.caption_dropout_every_n_epochs < 0:
        raise SettingsError(f"--caption_dropout_every_n_epochs {ns.caption_dropout_every_n_epochs}: must be 0 or more")
    if not ns.caption_separator:
        raise SettingsError("--caption_separator: must not be empty")
    if ns.dataset_repeats < 1:
        raise SettingsError(f"--dataset_repeats {ns.dataset_repeats}: must be 1 or more")
    cache_flag = text_cache_flag(ns.cache_text_encoder_outputs, ns.cache_text_encoder_outputs_to_disk)
    if cache_flag:
        for name in PER_STEP_CAPTION_OPTIONS:
            if getattr(ns, name):
                raise SettingsError(f"--{name} changes the caption every step, but {cache_flag} encodes each caption "
                                    f"once: remove one of them (as upstream)")
    face_range = None
    if ns.face_crop_aug_range is not None:
        from library.image_augment import parse_face_crop_range

        try:
            face_range = parse_face_crop_range(ns.face_crop_aug_range)
        except ValueError as exc:
            raise SettingsError(f"--face_crop_aug_range: {exc}") from None
    cache_latents = latent_cache_flag(ns.cache_latents, ns.cache_latents_to_disk)
    for name in PER_STEP_IMAGE_OPTIONS:
        if getattr(ns, name) and cache_latents:
            raise SettingsError(f"--{name} changes the image every step, but {cache_latents} encodes each image once: "
                                f"remove {cache_latents} (the images are then encoded every step) or --{name} "
                                "(as upstream)")
    return {"face_crop_aug_range": face_range, **{name: getattr(ns, name) for name in (
        "random_crop", "color_aug", "shuffle_caption", "caption_separator", "keep_tokens_separator",
        "secondary_separator", "enable_wildcard", "caption_dropout_rate", "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate", "dataset_repeats", "alpha_mask", "resize_interpolation")}}


def flow_options(ns: argparse.Namespace) -> dict:
    """FlowSettings fields for library.noise: offset/pyramid/perturbation noise, timestep range, Huber schedule."""
    lo, hi = ns.min_timestep, ns.max_timestep
    if lo is not None and not 0 <= lo <= 999:
        raise SettingsError(f"--min_timestep {lo}: must be from 0 to 999")
    if hi is not None and not 1 <= hi <= 1000:
        raise SettingsError(f"--max_timestep {hi}: must be from 1 to 1000")
    if lo is not None and hi is not None and lo > hi:
        raise SettingsError(f"--min_timestep {lo} is above --max_timestep {hi}")
    schedule = ns.huber_schedule or "constant"
    huber_loss = ns.loss_type in ("huber", "smooth_l1")
    if schedule == "snr":
        if huber_loss:
            raise SettingsError(f"--huber_schedule snr with --loss_type {ns.loss_type}: the SNR schedule needs a DDPM "
                                "noise schedule, which FLUX flow matching has not (upstream fails on it too); use "
                                "--huber_schedule constant or exponential")
        schedule = "constant"
    if ns.huber_c is None or ns.huber_c <= 0:
        raise SettingsError(f"--huber_c {ns.huber_c}: must be above 0")
    if ns.huber_scale is None or ns.huber_scale <= 0:
        raise SettingsError(f"--huber_scale {ns.huber_scale}: must be above 0")
    if not huber_loss and (ns.huber_schedule or ns.huber_c != 0.1 or ns.huber_scale != 1.0):
        log.warning("--huber_schedule/--huber_c/--huber_scale have no effect with --loss_type %s", ns.loss_type)
    for flag, base in (("noise_offset_random_strength", "noise_offset"),
                       ("ip_noise_gamma_random_strength", "ip_noise_gamma")):
        if getattr(ns, flag) and not getattr(ns, base):
            log.warning("--%s has no effect without --%s", flag, base)
    if ns.adaptive_noise_scale is not None and not ns.noise_offset:
        raise SettingsError(f"--adaptive_noise_scale {ns.adaptive_noise_scale} needs --noise_offset (it adds to the "
                            "offset strength), as upstream: add --noise_offset 0.05, or drop --adaptive_noise_scale")
    iterations = ns.multires_noise_iterations or 0
    if iterations < 0:
        raise SettingsError(f"--multires_noise_iterations {iterations}: must be 0 (off) or more (6-10 is usual)")
    discount = ns.multires_noise_discount
    if not 0.0 < discount <= 1.0:
        raise SettingsError(f"--multires_noise_discount {discount}: must be above 0 and at most 1 (default 0.3)")
    if not iterations and discount != 0.3:
        log.warning("--multires_noise_discount has no effect without --multires_noise_iterations")
    return {"noise_offset": _non_negative(ns, "noise_offset"),
            "noise_offset_random_strength": ns.noise_offset_random_strength,
            "adaptive_noise_scale": ns.adaptive_noise_scale, "multires_noise_iterations": iterations,
            "multires_noise_discount": float(discount),
            "ip_noise_gamma": _non_negative(ns, "ip_noise_gamma"),
            "ip_noise_gamma_random_strength": ns.ip_noise_gamma_random_strength,
            "min_timestep": lo, "max_timestep": hi, "huber_schedule": schedule, "huber_c": float(ns.huber_c),
            "huber_scale": float(ns.huber_scale)}


def _regularisation(ns: argparse.Namespace) -> RegularisationSettings:
    dropout = _rate(ns, "network_dropout", upper_open=True) or None
    norms = ns.scale_weight_norms
    if norms is not None and norms <= 0:
        raise SettingsError(f"--scale_weight_norms {norms}: must be above 0 (try 1.0), or leave it out")
    if ns.prior_loss_weight < 0:
        raise SettingsError(f"--prior_loss_weight {ns.prior_loss_weight}: must be 0 or more")
    return RegularisationSettings(network_dropout=dropout, scale_weight_norms=norms or None,
                                  masked_loss=ns.masked_loss)


def _probe_hub(seconds: float = HUB_PROBE_SECONDS) -> str | None:
    """None when huggingface.co answers on 443 within `seconds`, else why not. DNS can hang: bounded thread."""
    result: list[str | None] = ["no answer within %.0f s" % seconds]

    def probe() -> None:
        try:
            socket.create_connection(HUB_HOST, timeout=seconds).close()
            result[0] = None
        except OSError as exc:
            result[0] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(seconds + 0.5)
    return result[0]


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be used from here, or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return "the huggingface_hub package is not installed"
    return _probe_hub()


def _hub(ns: argparse.Namespace) -> HubSettings:
    repo = ns.huggingface_repo_id
    if not repo:
        for flag in ("save_state_to_huggingface", "async_upload", "huggingface_path_in_repo", "huggingface_token",
                     "huggingface_repo_type", "huggingface_repo_visibility"):
            if getattr(ns, flag):
                log.warning("--%s has no effect without --huggingface_repo_id", flag)
        if ns.resume_from_huggingface:
            raise SettingsError("--resume_from_huggingface needs --huggingface_repo_id (and --resume naming the state "
                                "folder in the repository)")
        return HubSettings()
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise SettingsError(f"--huggingface_repo_id {repo!r}: must look like user/name")
    if ns.huggingface_repo_visibility not in (None, "public", "private"):
        raise SettingsError(f"--huggingface_repo_visibility {ns.huggingface_repo_visibility!r}: use public or private")
    if ns.huggingface_repo_type not in (None, "model", "dataset", "space"):
        raise SettingsError(f"--huggingface_repo_type {ns.huggingface_repo_type!r}: use model, dataset or space")
    if ns.resume_from_huggingface and not ns.resume:
        raise SettingsError("--resume_from_huggingface needs --resume: the state folder's path in the repository")
    reason = hub_offline_reason()
    if reason is not None:
        if ns.resume_from_huggingface:
            raise SettingsError(f"--resume_from_huggingface: the Hugging Face Hub cannot be reached ({reason}); "
                                "download the state folder elsewhere and pass it to --resume")
        message = (f"--huggingface_repo_id {repo}: the Hugging Face Hub cannot be reached ({reason}). Training goes "
                   f"on and saves locally only; nothing will be uploaded. Upload the files later from a machine "
                   "with network access")
        log.warning(message)
        print(f"warning: {message}", flush=True)
    return HubSettings(repo_id=repo, repo_type=ns.huggingface_repo_type or "model",
                       path_in_repo=ns.huggingface_path_in_repo, token=ns.huggingface_token,
                       visibility=ns.huggingface_repo_visibility, save_state=ns.save_state_to_huggingface,
                       resume_from_hub=ns.resume_from_huggingface, async_upload=ns.async_upload,
                       online=reason is None)


def option_settings_from_args(ns: argparse.Namespace) -> dict:
    """The TrainSettings fields this module owns, as keyword arguments."""
    return {"regularisation": _regularisation(ns), "hub": _hub(ns)}
