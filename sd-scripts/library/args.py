"""Command-line flags of the trainer, with upstream sd-scripts' names, types and defaults.

Flags are grouped the way upstream groups them so that `train_network.setup_parser()` and
`flux_train_utils.add_flux_train_arguments()` expose the same subsets FluxGym introspects.
Upstream flags this trainer does not implement are still registered, so that passing one
fails loudly ("not supported by this trainer: --flag", exit 2) instead of being ignored.
"""
from __future__ import annotations

import argparse

UNSUPPORTED_MESSAGE = "not supported by this trainer: {flag} ({reason})"

_SD_ONLY = "SD1/SDXL only; FLUX does not use it"
_SD_NOISE = "SD1/SDXL noise schedule option; FLUX flow matching does not use it"
_DEEPSPEED = "DeepSpeed/ZeRO is not available here; for memory use --blocks_to_swap, --fp8_base or --full_bf16"
_CONTROLNET = "ControlNet training, not LoRA; use upstream's flux_train_control_net.py"

# Real upstream flags we do not implement, each with the reason the error gives. Each takes any number of
# values so the error names the flag itself, not a confusing "expected one argument".
UNSUPPORTED_FLAGS: dict[str, str] = {
    "--v2": _SD_ONLY, "--v_parameterization": _SD_ONLY, "--clip_skip": _SD_ONLY, "--no_half_vae": _SD_ONLY,
    "--vae": "SD1/SDXL only; the FLUX autoencoder is --ae", "--max_token_length": _SD_ONLY + " (T5: --t5xxl_max_token_length)",
    "--zero_terminal_snr": _SD_NOISE, "--min_snr_gamma": _SD_NOISE, "--debiased_estimation_loss": _SD_NOISE,
    "--scale_v_pred_loss_like_noise_pred": _SD_NOISE, "--v_pred_like_loss": _SD_NOISE,
    "--token_warmup_min": "token warmup is an SD1/SDXL caption option; not used by FLUX LoRA",
    "--token_warmup_step": "token warmup is an SD1/SDXL caption option; not used by FLUX LoRA",
    "--conditioning_data_dir": _CONTROLNET, "--controlnet_model_name_or_path": _CONTROLNET,
    "--deepspeed": _DEEPSPEED, "--zero_stage": _DEEPSPEED, "--offload_optimizer_device": _DEEPSPEED,
    "--offload_optimizer_nvme_path": _DEEPSPEED, "--offload_param_device": _DEEPSPEED,
    "--offload_param_nvme_path": _DEEPSPEED, "--zero3_init_flag": _DEEPSPEED, "--zero3_save_16bit_model": _DEEPSPEED,
    "--fp16_master_weights_and_gradients": _DEEPSPEED,
}

DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")


class UnsupportedFlag(argparse.Action):
    """Refuse a real upstream flag we do not implement (exit 2, naming the flag)."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("nargs", "*")
        kwargs["default"] = argparse.SUPPRESS
        self.reason = UNSUPPORTED_FLAGS.get(option_strings[0], "")
        kwargs["help"] = f"upstream flag, not supported by this trainer: {self.reason}"
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(UNSUPPORTED_MESSAGE.format(flag=option_string, reason=self.reason))


def _float_or_int(text: str):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="FLUX DiT: BFL single file (.safetensors/.sft) or a diffusers directory")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="folder with openai_clip-vit-large-patch14/ and google_t5-v1_1-xxl/ (offline use)")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--train_data_dir", type=str, default=None, help="folder of `<repeats>_<name>` subfolders")
    group.add_argument("--dataset_config", type=str, default=None, help="dataset .toml or .json")
    group.add_argument("--in_json", type=str, default=None,
                       help="fine-tuning metadata JSON (image key -> caption/tags) for the images in --train_data_dir")
    group.add_argument("--dataset_class", type=str, default=None,
                       help="package.module.ClassName giving the images and captions (library.dataset_class); "
                            "instead of --dataset_config/--train_data_dir")
    group.add_argument("--cache_info", action="store_true", help="accepted; caches always keep their own index")
    group.add_argument("--caption_extension", type=str, default=".caption")
    group.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)
    group.add_argument("--keep_tokens", type=int, default=0, help="accepted; only matters with shuffle_caption")
    group.add_argument("--caption_prefix", type=str, default=None)
    group.add_argument("--caption_suffix", type=str, default=None)
    group.add_argument("--flip_aug", action="store_true")
    # per-step augmentations (library.image_augment): without a latent cache flag the images are encoded every step
    group.add_argument("--color_aug", action="store_true",
                       help="random hue shift or gamma per step (needs no --cache_latents; images encoded per step)")
    group.add_argument("--random_crop", action="store_true",
                       help="random instead of centre crop per step (needs no --cache_latents)")
    group.add_argument("--face_crop_aug_range", type=str, default=None,
                       help="without buckets: crop around the face box in the file name (name_cx_cy_w_h.png), "
                            "face size scaled into this range, e.g. 2.0,4.0")
    group.add_argument("--resolution", type=str, default=None, help="`512` or `512,768` (width,height)")
    group.add_argument("--cache_latents", action="store_true")
    group.add_argument("--cache_latents_to_disk", action="store_true")
    group.add_argument("--vae_batch_size", type=int, default=1)
    group.add_argument("--skip_cache_check", action="store_true",
                       help="accepted; fingerprints are cheap, caches are always checked")
    group.add_argument("--enable_bucket", action="store_true")
    group.add_argument("--min_bucket_reso", type=int, default=256)
    group.add_argument("--max_bucket_reso", type=int, default=1024)
    group.add_argument("--bucket_reso_steps", type=int, default=64)
    group.add_argument("--bucket_no_upscale", action="store_true")
    group.add_argument("--debug_dataset", action="store_true",
                       help="list each image with its epoch-1 caption, bucket and repeats, then exit 0 (no training)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default=None)
    group.add_argument("--output_name", type=str, default=None)
    group.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    group.add_argument("--save_every_n_epochs", type=int, default=None)
    group.add_argument("--save_every_n_steps", type=int, default=None)
    group.add_argument("--save_last_n_epochs", type=int, default=None)
    group.add_argument("--save_last_n_epochs_state", type=int, default=None)
    group.add_argument("--save_last_n_steps", type=int, default=None)
    group.add_argument("--save_last_n_steps_state", type=int, default=None)
    group.add_argument("--save_state", action="store_true")
    group.add_argument("--save_state_on_train_end", action="store_true")
    group.add_argument("--resume", type=str, default=None,
                       help="state folder to resume from, or `auto` for the newest valid one in --output_dir")
    group.add_argument("--train_batch_size", type=int, default=1)
    group.add_argument("--sdpa", action="store_true", help="accepted; FLUX always uses torch SDPA")
    group.add_argument("--max_train_steps", type=int, default=1600)
    group.add_argument("--max_train_epochs", type=int, default=None)
    group.add_argument("--max_data_loader_n_workers", type=int, default=8)
    group.add_argument("--persistent_data_loader_workers", action="store_true")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    group.add_argument("--fp8_base", action="store_true")
    group.add_argument("--ddp_timeout", type=float, default=None,
                       help="minutes (fractions allowed); bounds every multi-process barrier and collective")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                       help="accepted; no DDP wrapper here (the trainer averages LoRA gradients itself)")
    group.add_argument("--ddp_static_graph", action="store_true",
                       help="accepted; no DDP wrapper here (the trainer averages LoRA gradients itself)")
    group.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"])
    group.add_argument("--lowram", action="store_true", help="accepted; no effect on this trainer")
    group.add_argument("--highvram", action="store_true", help="accepted; no effect on this trainer")
    group.add_argument("--sample_every_n_steps", type=int, default=None)
    group.add_argument("--sample_at_first", action="store_true")
    group.add_argument("--sample_every_n_epochs", type=int, default=None)
    group.add_argument("--sample_prompts", type=str, default=None)
    group.add_argument("--sample_sampler", type=str, default="ddim", help="ignored for FLUX, as upstream")
    group.add_argument("--config_file", type=str, default=None)
    group.add_argument("--output_config", action="store_true")
    for key in ("title", "author", "description", "license", "tags"):
        group.add_argument(f"--metadata_{key}", type=str, default=None)
    group.add_argument("--console_log_level", type=str, default=None)
    group.add_argument("--console_log_file", type=str, default=None)
    group.add_argument("--console_log_simple", action="store_true")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer_type", type=str, default="", help="AdamW (default), AdamW8bit, Adafactor, Lion")
    group.add_argument("--learning_rate", type=float, default=2.0e-6)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    group.add_argument("--fused_backward_pass", action="store_true",
                       help="step each LoRA tensor during backward and free its gradient (less gradient memory); "
                            "--max_grad_norm then clips each tensor alone; per-parameter optimizers only")
    group.add_argument("--optimizer_args", type=str, default=None, nargs="*", help="key=value ...")
    group.add_argument("--lr_scheduler", type=str, default="constant")
    group.add_argument("--lr_warmup_steps", type=_float_or_int, default=0, help="steps, or a ratio of total steps")
    group.add_argument("--lr_decay_steps", type=_float_or_int, default=0)
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    group.add_argument("--lr_scheduler_power", type=float, default=1.0)


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--no_metadata", action="store_true")
    group.add_argument("--save_model_as", type=str, default="safetensors", choices=["ckpt", "pt", "safetensors"])
    group.add_argument("--unet_lr", type=float, default=None)
    group.add_argument("--text_encoder_lr", type=float, default=None, nargs="*")
    group.add_argument("--fp8_base_unet", action="store_true")
    group.add_argument("--network_weights", type=str, default=None)
    group.add_argument("--network_module", type=str, default=None)
    group.add_argument("--network_dim", type=int, default=None)
    group.add_argument("--network_alpha", type=float, default=1)
    group.add_argument("--network_args", type=str, default=None, nargs="*")
    group.add_argument("--network_train_unet_only", action="store_true")
    group.add_argument("--network_train_text_encoder_only", action="store_true",
                       help="train only the CLIP-L LoRA (no transformer LoRA modules)")
    group.add_argument("--training_comment", type=str, default=None)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's tracker flags (library.tracking): TensorBoard and/or wandb."""
    group = parser.add_argument_group("logging")
    group.add_argument("--logging_dir", type=str, default=None,
                       help="TensorBoard logs go to LOGGING_DIR/<log_prefix><timestamp>/<log_tracker_name>")
    group.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                       help="default: tensorboard when --logging_dir is given")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the timestamped log folder")
    group.add_argument("--log_tracker_name", type=str, default=None, help="tracker/project name (network_train)")
    group.add_argument("--wandb_run_name", type=str, default=None)
    group.add_argument("--log_tracker_config", type=str, default=None,
                       help="toml with per-tracker init options, e.g. [wandb] entity = ...")
    group.add_argument("--wandb_api_key", type=str, default=None, help="logs in to wandb before training")
    group.add_argument("--log_config", action="store_true", help="record the training flags in the tracker")


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's validation-loss flags (library.validation)."""
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_seed", type=int, default=None, help="split and noise seed (default: --seed)")
    group.add_argument("--validation_split", type=float, default=0.0,
                       help="fraction of each image folder held out for validation (0 disables)")
    group.add_argument("--validate_every_n_steps", type=int, default=None)
    group.add_argument("--validate_every_n_epochs", type=int, default=None,
                       help="default: every epoch when a validation split is set")
    group.add_argument("--max_validation_steps", type=int, default=None, help="validation batches per pass")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's precision/memory/compile flags (library.precision)."""
    group = parser.add_argument_group("precision and memory")
    group.add_argument("--full_fp16", action="store_true", help="LoRA weights and gradients in fp16 (needs fp16)")
    group.add_argument("--full_bf16", action="store_true", help="LoRA weights and gradients in bf16 (needs bf16)")
    group.add_argument("--cpu_offload_checkpointing", action="store_true",
                       help="keep checkpointed activations in CPU memory (with --gradient_checkpointing)")
    group.add_argument("--mem_eff_attn", action="store_true", help="accepted; FLUX attention is always SDPA")
    group.add_argument("--xformers", action="store_true", help="accepted; FLUX attention is always SDPA")
    group.add_argument("--torch_compile", action="store_true", help="torch.compile the transformer blocks")
    group.add_argument("--dynamo_backend", type=str, default="inductor", choices=list(DYNAMO_BACKENDS))


def add_continuation_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's scheduler extras, manual restart, base-weight and optimizer shortcut flags."""
    group = parser.add_argument_group("schedules and continuation")
    group.add_argument("--lr_scheduler_type", type=str, default="",
                       help="a torch.optim.lr_scheduler class name or a dotted class path")
    group.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*", help="key=value ...")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None, help="inverse_sqrt timescale")
    group.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="cosine_with_min_lr / warmup_stable_decay floor, as a ratio of the LR")
    group.add_argument("--initial_epoch", type=int, default=None, help="start at this epoch (1-based)")
    group.add_argument("--initial_step", type=int, default=None, help="start at this step")
    group.add_argument("--skip_until_initial_step", action="store_true",
                       help="with --initial_step/--initial_epoch: start at the exact batch (else the epoch start)")
    group.add_argument("--dim_from_weights", action="store_true", help="take --network_dim from --network_weights")
    group.add_argument("--base_weights", type=str, default=None, nargs="*",
                       help="LoRA files merged into the base model before training")
    group.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*")
    group.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")
    group.add_argument("--save_n_epoch_ratio", type=int, default=None,
                       help="save about this many epoch checkpoints in all (overrides --save_every_n_epochs)")


HUBER_SCHEDULES = ("constant", "exponential", "snr")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's caption options (library.captions); dataset.toml keys of the same names win over them."""
    group = parser.add_argument_group("captions")
    group.add_argument("--shuffle_caption", action="store_true", help="shuffle the comma-separated tags each step")
    group.add_argument("--caption_separator", type=str, default=",", help="tag separator (default ,)")
    group.add_argument("--keep_tokens_separator", type=str, default="",
                       help="tags before it (and after a second one) stay fixed when shuffling, e.g. |||")
    group.add_argument("--secondary_separator", type=str, default=None,
                       help="a separator that keeps tags together while shuffling; becomes caption_separator")
    group.add_argument("--enable_wildcard", action="store_true",
                       help="{a|b|c} picks one per step; a multi-line caption file gives one line per step")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0, help="chance of an empty caption per item")
    group.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                       help="every Nth epoch trains with empty captions")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                       help="chance of dropping each tag (not the keep_tokens ones)")
    group.add_argument("--weighted_captions", action="store_true",
                       help="(word) x1.1, [word] /1.1, (word:1.5) weight the T5 tokens of captions and sample prompts; "
                            "keep commas out of brackets when shuffling or dropping tags")


def add_regularisation_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's noise, timestep, Huber, LoRA-dropout and data-weighting options (library.noise etc.)."""
    group = parser.add_argument_group("regularisation and timesteps")
    group.add_argument("--noise_offset", type=float, default=None, help="per-channel offset noise strength (~0.1)")
    group.add_argument("--noise_offset_random_strength", action="store_true",
                       help="offset strength drawn uniformly from 0..noise_offset each step")
    group.add_argument("--adaptive_noise_scale", type=float, default=None,
                       help="adds this times |mean of each latent channel| to the noise offset (needs --noise_offset)")
    group.add_argument("--multires_noise_iterations", type=int, default=None,
                       help="pyramid (multi-resolution) noise levels, e.g. 6-10")
    group.add_argument("--multires_noise_discount", type=float, default=0.3,
                       help="weight falloff per pyramid level (default 0.3)")
    group.add_argument("--ip_noise_gamma", type=float, default=None, help="input perturbation noise (~0.1)")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="perturbation strength drawn uniformly from 0..ip_noise_gamma each step")
    group.add_argument("--min_timestep", type=int, default=None, help="lowest timestep trained (0-999, default 0)")
    group.add_argument("--max_timestep", type=int, default=None, help="highest timestep trained (1-1000, default 1000)")
    group.add_argument("--huber_schedule", type=str, default=None, choices=list(HUBER_SCHEDULES),
                       help="Huber/smooth L1 threshold schedule: constant (the default here) or exponential; "
                            "snr needs a DDPM schedule, which FLUX has not (upstream fails on it too)")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber threshold (decay base for exponential)")
    group.add_argument("--huber_scale", type=float, default=1.0, help="multiplies the Huber threshold")
    group.add_argument("--network_dropout", type=float, default=None, help="LoRA neuron dropout (0-1), training only")
    group.add_argument("--scale_weight_norms", type=float, default=None,
                       help="max norm of each LoRA module's weight (~1.0); shown in the progress bar")
    group.add_argument("--reg_data_dir", type=str, default=None,
                       help="regularisation images, <repeats>_<class> folders")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    group.add_argument("--dataset_repeats", type=int, default=1, help="num_repeats where nothing else sets it")
    group.add_argument("--alpha_mask", action="store_true", help="use each image's alpha channel as a loss mask")
    group.add_argument("--masked_loss", action="store_true",
                       help="weight the loss by the alpha mask (needs alpha_mask)")
    group.add_argument("--resize_interpolation", type=str, default=None, choices=list(RESIZE_INTERPOLATIONS),
                       help="resampling used to resize images to their bucket (default: lanczos)")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's Hugging Face Hub options (library.hub_sync over library.huggingface_util)."""
    group = parser.add_argument_group("hugging face hub")
    group.add_argument("--huggingface_repo_id", type=str, default=None, help="upload each saved LoRA to user/name")
    group.add_argument("--huggingface_repo_type", type=str, default=None, help="model (default), dataset or space")
    group.add_argument("--huggingface_path_in_repo", type=str, default=None, help="folder inside the repository")
    group.add_argument("--huggingface_token", type=str, default=None, help="access token (default: the saved login)")
    group.add_argument("--huggingface_repo_visibility", type=str, default=None,
                       help="public (default) or private, for a repository created by the upload")
    group.add_argument("--save_state_to_huggingface", action="store_true", help="upload state folders too")
    group.add_argument("--resume_from_huggingface", action="store_true",
                       help="--resume names a Hub folder: user/name/path[:revision]")
    group.add_argument("--async_upload", action="store_true", help="upload in the background while training goes on")


def add_unsupported_arguments(parser: argparse.ArgumentParser) -> None:
    existing = set(parser._option_string_actions)
    for flag in UNSUPPORTED_FLAGS:
        if flag not in existing:
            parser.add_argument(flag, action=UnsupportedFlag)


def add_flux_arguments(parser: argparse.ArgumentParser) -> None:
    """The FLUX group upstream defines in flux_train_utils.add_flux_train_arguments."""
    group = parser.add_argument_group("flux")
    group.add_argument("--clip_l", type=str, default=None, help="CLIP-L weights (clip_l.safetensors)")
    group.add_argument("--t5xxl", type=str, default=None, help="T5-XXL weights (t5xxl_fp16.safetensors)")
    group.add_argument("--ae", type=str, default=None, help="autoencoder weights (ae.sft)")
    group.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default 512 dev / 256 schnell")
    group.add_argument("--apply_t5_attn_mask", action="store_true")
    group.add_argument("--guidance_scale", type=float, default=3.5)
    group.add_argument("--timestep_sampling", type=str, default="sigma",
                       choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
    group.add_argument("--sigmoid_scale", type=float, default=1.0)
    group.add_argument("--model_prediction_type", type=str, default="sigma_scaled",
                       choices=["raw", "additive", "sigma_scaled"])
    group.add_argument("--discrete_flow_shift", type=float, default=3.0)
    group.add_argument("--model_type", type=str, default="flux", choices=["flux", "chroma"],
                       help="flux (FLUX.1 dev/schnell and their fine-tunes); chroma is refused: this trainer cannot "
                            "load Chroma checkpoints")


def add_dit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags upstream adds in add_dit_training_arguments (FluxGym's panel does not see them)."""
    group = parser.add_argument_group("dit")
    group.add_argument("--cache_text_encoder_outputs", action="store_true")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    group.add_argument("--text_encoder_batch_size", type=int, default=None)
    group.add_argument("--disable_mmap_load_safetensors", action="store_true")
    group.add_argument("--weighting_scheme", type=str, default="uniform",
                       choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"])
    group.add_argument("--logit_mean", type=float, default=0.0)
    group.add_argument("--logit_std", type=float, default=1.0)
    group.add_argument("--mode_scale", type=float, default=1.29)
    group.add_argument("--blocks_to_swap", type=int, default=None, help="DiT blocks kept on the CPU and swapped in")
    group.add_argument("--split_mode", action="store_true", help="deprecated: same as --blocks_to_swap 18")
    # upstream adds this one (like --split_mode) in flux_train_network.setup_parser
    group.add_argument("--bypass_flux_guidance", action="store_true",
                       help="train without the guidance embedding (for Flex.1-alpha); samples still use guidance")


def add_hardening_arguments(parser: argparse.ArgumentParser) -> None:
    """Our own bounds on every wait that can hang (seconds; 0 disables)."""
    group = parser.add_argument_group("hang hardening")
    group.add_argument("--dataloader_timeout", type=float, default=300.0,
                       help="seconds a DataLoader worker may take for one batch (only with workers > 0)")
    group.add_argument("--block_swap_timeout", type=float, default=60.0, help="seconds per block-swap wait")
    group.add_argument("--cache_io_timeout", type=float, default=30.0, help="seconds per cached .npz read")
    group.add_argument("--sample_timeout", type=float, default=600.0, help="seconds per sample image")
    group.add_argument("--save_timeout", type=float, default=900.0, help="seconds per checkpoint save")
    group.add_argument("--stall_dump_timeout", type=float, default=600.0,
                       help="seconds without progress before all thread stacks are dumped (no kill)")
