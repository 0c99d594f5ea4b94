"""Command-line flags of the trainer, with upstream sd-scripts' names, types and defaults.

Flags are grouped the way upstream groups them so that `train_network.setup_parser()` and
`flux_train_utils.add_flux_train_arguments()` expose the same subsets FluxGym introspects.
Upstream flags this trainer does not implement are still registered, so that passing one
fails loudly ("not supported by this trainer: --flag", exit 2) instead of being ignored.
"""
from __future__ import annotations

import argparse

UNSUPPORTED_MESSAGE = "not supported by this trainer: {flag}"

# Real upstream flags we do not implement. Each takes any number of values so the
# error names the flag itself, not a confusing "expected one argument".
UNSUPPORTED_FLAGS = (
    "--v2", "--v_parameterization", "--in_json", "--reg_data_dir", "--dataset_class",
    "--dataset_repeats", "--shuffle_caption", "--caption_separator", "--keep_tokens_separator",
    "--secondary_separator", "--enable_wildcard", "--color_aug", "--face_crop_aug_range",
    "--random_crop", "--debug_dataset", "--token_warmup_min", "--token_warmup_step", "--alpha_mask",
    "--caption_dropout_rate", "--caption_dropout_every_n_epochs", "--caption_tag_dropout_rate",
    "--huggingface_repo_id", "--huggingface_repo_type", "--huggingface_path_in_repo",
    "--huggingface_token", "--huggingface_repo_visibility", "--save_state_to_huggingface",
    "--resume_from_huggingface", "--async_upload", "--save_n_epoch_ratio", "--max_token_length",
    "--torch_compile", "--dynamo_backend", "--vae", "--full_fp16", "--full_bf16",
    "--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--clip_skip", "--logging_dir", "--log_with",
    "--log_prefix", "--log_tracker_name", "--wandb_run_name", "--log_tracker_config", "--wandb_api_key",
    "--log_config", "--noise_offset", "--noise_offset_random_strength", "--multires_noise_iterations",
    "--multires_noise_discount", "--ip_noise_gamma", "--ip_noise_gamma_random_strength",
    "--adaptive_noise_scale", "--zero_terminal_snr", "--min_timestep", "--max_timestep",
    "--huber_schedule", "--huber_c", "--huber_scale", "--prior_loss_weight", "--conditioning_data_dir",
    "--masked_loss", "--initial_epoch", "--initial_step", "--skip_until_initial_step", "--validation_seed",
    "--validation_split", "--validate_every_n_steps", "--validate_every_n_epochs", "--max_validation_steps",
    "--deepspeed", "--zero_stage", "--offload_optimizer_device", "--offload_optimizer_nvme_path",
    "--offload_param_device", "--offload_param_nvme_path", "--zero3_init_flag", "--zero3_save_16bit_model",
    "--fp16_master_weights_and_gradients", "--use_8bit_adam", "--use_lion_optimizer", "--lr_scheduler_type",
    "--lr_scheduler_args", "--fused_backward_pass", "--lr_scheduler_timescale", "--lr_scheduler_min_lr_ratio",
    "--min_snr_gamma", "--scale_v_pred_loss_like_noise_pred", "--v_pred_like_loss", "--debiased_estimation_loss",
    "--weighted_captions", "--network_dropout", "--network_train_text_encoder_only", "--dim_from_weights",
    "--scale_weight_norms", "--base_weights", "--base_weights_multiplier", "--no_half_vae",
    "--cpu_offload_checkpointing", "--controlnet_model_name_or_path", "--model_type",
    "--bypass_flux_guidance", "--mem_eff_attn", "--xformers", "--resize_interpolation",
)


class _Unsupported(argparse.Action):
    """Refuse a real upstream flag we do not implement (exit 2, naming the flag)."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("nargs", "*")
        kwargs["default"] = argparse.SUPPRESS
        kwargs["help"] = "upstream flag, not supported by this trainer"
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(UNSUPPORTED_MESSAGE.format(flag=option_string))


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
    group.add_argument("--cache_info", action="store_true", help="accepted; caches always keep their own index")
    group.add_argument("--caption_extension", type=str, default=".caption")
    group.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)
    group.add_argument("--keep_tokens", type=int, default=0, help="accepted; only matters with shuffle_caption")
    group.add_argument("--caption_prefix", type=str, default=None)
    group.add_argument("--caption_suffix", type=str, default=None)
    group.add_argument("--flip_aug", action="store_true")
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
    group.add_argument("--optimizer_type", type=str, default="", help="AdamW (default), AdamW8bit, Adafactor")
    group.add_argument("--learning_rate", type=float, default=2.0e-6)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
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
    group.add_argument("--training_comment", type=str, default=None)


def add_unsupported_arguments(parser: argparse.ArgumentParser) -> None:
    existing = set(parser._option_string_actions)
    for flag in UNSUPPORTED_FLAGS:
        if flag not in existing:
            parser.add_argument(flag, action=_Unsupported)


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
