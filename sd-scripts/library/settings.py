"""Typed training settings, built once from the parsed command line.

argparse stays at the edge (`library.args`); everything past `settings_from_args` reads
these frozen dataclasses. Upstream's implied-flag rules (`_to_disk` implies caching,
`--fp8_base_unet` implies `--fp8_base`, `--split_mode` means 18 swapped blocks) and its
argument checks live here, each failing with a message that names the flag.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import BadFlagError

log = logging.getLogger(__name__)


class SettingsError(BadFlagError):
    """A flag combination that cannot work; the message names the flag(s) and the fix."""


@dataclass(frozen=True)
class ModelSettings:
    dit_path: str
    clip_l_path: str
    t5xxl_path: str
    ae_path: str
    tokenizer_cache_dir: str | None
    fp8_base: bool
    fp8_base_unet: bool
    disable_mmap: bool
    t5xxl_max_token_length: int | None
    apply_t5_attn_mask: bool
    weighted_captions: bool = False  # prompt-weight syntax weights the T5 tokens (library.prompt_weights)


@dataclass(frozen=True)
class DataSettings:
    dataset_config: str | None
    train_data_dir: str | None
    cli_fallbacks: dict
    cache_latents_to_disk: bool
    cache_text_encoder_outputs: bool
    cache_text_encoder_outputs_to_disk: bool
    vae_batch_size: int
    text_encoder_batch_size: int | None
    num_workers: int
    persistent_workers: bool
    reg_data_dir: str | None = None
    prior_loss_weight: float = 1.0  # loss weight of regularisation images
    in_json: str | None = None  # upstream's fine-tuning metadata file, with train_data_dir
    dataset_class: str | None = None  # package.module.ClassName giving the items (library.dataset_class)
    cache_latents: bool = False  # --cache_latents given (latents are cached in memory anyway, unless augmented)

    @property
    def latent_cache_flag(self) -> str | None:
        """The latent cache flag the user gave, for messages (library.image_augment)."""
        from library.cache_rules import latent_cache_flag

        return latent_cache_flag(self.cache_latents, self.cache_latents_to_disk)


@dataclass(frozen=True)
class NetworkSettings:
    module: str
    dim: int
    alpha: float
    args: dict
    train_unet_only: bool
    weights: str | None
    train_text_encoder_only: bool = False  # CLIP-L LoRA only: the network has no transformer modules

    @property
    def train_blocks(self) -> str:
        return self.args.get("train_blocks", "all")


@dataclass(frozen=True)
class OptimizerSettings:
    type: str
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: float | None
    args: dict
    scheduler: str
    warmup_steps: float
    decay_steps: float
    num_cycles: int
    power: float
    max_grad_norm: float
    scheduler_type: str = ""  # --lr_scheduler_type: a torch (or dotted) scheduler class, overrides `scheduler`
    scheduler_args: dict = field(default_factory=dict)
    timescale: int | None = None
    min_lr_ratio: float | None = None
    fused_backward_pass: bool = False  # library.fused_backward: per-parameter steps from gradient hooks


@dataclass(frozen=True)
class FlowSettings:
    timestep_sampling: str
    sigmoid_scale: float
    discrete_flow_shift: float
    model_prediction_type: str
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    guidance_scale: float
    loss_type: str
    # library.noise: offset/perturbation noise, the trained timestep range and the Huber threshold schedule
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None  # adds scale * |latent channel mean| to the offset strength
    multires_noise_iterations: int = 0  # 0: off
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    huber_schedule: str = "constant"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    bypass_guidance: bool = False  # --bypass_flux_guidance: training forwards skip the guidance embedding


@dataclass(frozen=True)
class SaveSettings:
    output_dir: Path
    output_name: str
    save_precision: str | None
    every_n_epochs: int | None
    every_n_steps: int | None
    last_n_epochs: int | None
    last_n_epochs_state: int | None
    last_n_steps: int | None
    last_n_steps_state: int | None
    save_state: bool
    save_state_on_train_end: bool
    resume: str | None
    no_metadata: bool
    training_comment: str | None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SampleSettings:
    prompts: str | None
    every_n_steps: int | None
    every_n_epochs: int | None
    at_first: bool

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and bool(self.every_n_steps or self.every_n_epochs or self.at_first)


@dataclass(frozen=True)
class GuardSettings:
    dataloader_timeout: float
    block_swap_timeout: float
    cache_io_timeout: float
    sample_timeout: float
    save_timeout: float
    stall_dump_timeout: float
    ddp_timeout_minutes: float | None


@dataclass(frozen=True)
class RunSettings:
    seed: int
    mixed_precision: str
    gradient_checkpointing: bool
    max_train_steps: int
    max_train_epochs: int | None
    blocks_to_swap: int
    batch_size: int


@dataclass(frozen=True)
class TrackingSettings:
    """--logging_dir/--log_with and friends (library.tracking)."""

    log_with: tuple[str, ...] = ()  # "tensorboard" and/or "wandb"; empty: no tracker
    logging_dir: str | None = None
    log_prefix: str = ""
    tracker_name: str = "network_train"
    wandb_run_name: str | None = None
    tracker_config: dict = field(default_factory=dict)  # --log_tracker_config, per tracker
    wandb_api_key: str | None = None
    log_config: bool = False


@dataclass(frozen=True)
class ValidationSettings:
    """--validation_split and friends (library.validation)."""

    split: float = 0.0
    seed: int = 42
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    max_steps: int | None = None

    @property
    def enabled(self) -> bool:
        return self.split > 0


@dataclass(frozen=True)
class PrecisionSettings:
    """--full_bf16/--full_fp16, activation offload and torch.compile (library.precision)."""

    full_bf16: bool = False
    full_fp16: bool = False
    cpu_offload_checkpointing: bool = False
    torch_compile: bool = False
    dynamo_backend: str = "inductor"


@dataclass(frozen=True)
class ContinuationSettings:
    """Upstream's manual restart and base-weight flags (library.continuation)."""

    initial_step: int | None = None
    initial_epoch: int | None = None
    skip_until_initial_step: bool = False
    base_weights: tuple[str, ...] = ()
    base_weights_multipliers: tuple[float, ...] = ()
    save_n_epoch_ratio: int | None = None


@dataclass(frozen=True)
class RegularisationSettings:
    """LoRA dropout and weight-norm options (networks.lora_flux) and the loss mask."""

    network_dropout: float | None = None
    scale_weight_norms: float | None = None
    masked_loss: bool = False


@dataclass(frozen=True)
class HubSettings:
    """--huggingface_* (library.hub_sync); `online` is the preflight's verdict."""

    repo_id: str | None = None
    repo_type: str = "model"
    path_in_repo: str | None = None
    token: str | None = None
    visibility: str | None = None
    save_state: bool = False
    resume_from_hub: bool = False
    async_upload: bool = False
    online: bool = False

    @property
    def uploads(self) -> bool:
        return bool(self.repo_id) and self.online


@dataclass(frozen=True)
class TrainSettings:
    model: ModelSettings
    data: DataSettings
    network: NetworkSettings
    optimizer: OptimizerSettings
    flow: FlowSettings
    save: SaveSettings
    sample: SampleSettings
    guards: GuardSettings
    run: RunSettings
    raw: dict  # the parsed namespace as a dict, for ss_* metadata
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    continuation: ContinuationSettings = field(default_factory=ContinuationSettings)
    regularisation: RegularisationSettings = field(default_factory=RegularisationSettings)
    hub: HubSettings = field(default_factory=HubSettings)

    def resume_settings(self) -> dict:
        """Settings a resumed run must share with the run that wrote the state."""
        return {
            "network_module": self.network.module,
            "network_dim": self.network.dim,
            "network_alpha": float(self.network.alpha),
            "train_blocks": self.network.train_blocks,
            "network_train_unet_only": self.network.train_unet_only,
            "optimizer_type": self.optimizer.type.lower() or "adamw",
            # only when set, so that states written before this flag existed keep their digest
            **({"network_train_text_encoder_only": True} if self.network.train_text_encoder_only else {}),
        }

    def args_digest(self) -> str:
        blob = json.dumps(self.resume_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def parse_key_values(items: list[str] | None, flag: str, *, literal: bool) -> dict:
    """`key=value` items as upstream: split at the first `=`; optimizer values are Python literals."""
    result: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SettingsError(f"{flag}: `{item}` is not key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if literal:
            try:
                result[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                result[key] = value  # upstream would crash; a plain string is what the user meant
        else:
            result[key] = value.strip()
    return result


def _require(ns: argparse.Namespace, name: str, what: str) -> str:
    value = getattr(ns, name)
    if not value:
        raise SettingsError(f"--{name} is required: {what}")
    return value


def _check_network(ns: argparse.Namespace) -> None:
    module = ns.network_module or "networks.lora_flux"
    if module != "networks.lora_flux":
        raise SettingsError(f"--network_module {module}: this trainer only trains networks.lora_flux")
    if ns.save_model_as != "safetensors":
        raise SettingsError(f"--save_model_as {ns.save_model_as}: only safetensors is supported")
    if ns.gradient_accumulation_steps != 1:
        raise SettingsError("--gradient_accumulation_steps: " "not supported by this trainer (use 1)")
    if ns.network_train_unet_only and ns.network_train_text_encoder_only:
        raise SettingsError("--network_train_unet_only and --network_train_text_encoder_only: together they train "
                            "nothing; give at most one of them")


def _blocks_to_swap(ns: argparse.Namespace) -> int:
    if ns.split_mode:
        if ns.blocks_to_swap is None:
            log.warning("--split_mode is deprecated: using --blocks_to_swap 18 instead")
            return 18
        log.warning("--split_mode is deprecated and ignored because --blocks_to_swap is set")
    swap = ns.blocks_to_swap or 0
    if swap < 0:
        raise SettingsError(f"--blocks_to_swap {swap}: must be 0 or more")
    return swap


def _data(ns: argparse.Namespace) -> DataSettings:
    from library import dataset_class, option_settings

    dataset_class.check_flags(ns)
    if not ns.dataset_config and not ns.train_data_dir and not ns.dataset_class:
        raise SettingsError("--dataset_config (a dataset.toml), --train_data_dir or --dataset_class is required")
    if ns.in_json and not ns.dataset_config:
        if not ns.train_data_dir:
            raise SettingsError("--in_json needs --train_data_dir: the folder holding the images it lists")
        if not Path(ns.in_json).is_file():
            raise SettingsError(f"--in_json {ns.in_json}: file not found")
    resolution = None
    if ns.resolution:
        parts = [int(p) for p in str(ns.resolution).replace("x", ",").split(",") if p.strip()]
        resolution = parts if len(parts) == 2 else [parts[0], parts[0]]
    fallbacks = {
        "batch_size": ns.train_batch_size,
        "resolution": resolution,
        "caption_extension": ns.caption_extention or ns.caption_extension,
        "keep_tokens": ns.keep_tokens,
        "caption_prefix": ns.caption_prefix,
        "caption_suffix": ns.caption_suffix,
        "flip_aug": ns.flip_aug,
        "enable_bucket": ns.enable_bucket,
        "min_bucket_reso": ns.min_bucket_reso,
        "max_bucket_reso": ns.max_bucket_reso,
        "bucket_reso_steps": ns.bucket_reso_steps,
        "bucket_no_upscale": ns.bucket_no_upscale,
        **option_settings.dataset_fallbacks(ns),
    }
    cache_te = ns.cache_text_encoder_outputs or ns.cache_text_encoder_outputs_to_disk
    if ns.persistent_data_loader_workers and ns.max_data_loader_n_workers == 0:
        log.warning("--persistent_data_loader_workers has no effect with 0 workers")
    return DataSettings(
        dataset_config=ns.dataset_config, train_data_dir=ns.train_data_dir, cli_fallbacks=fallbacks,
        cache_latents_to_disk=ns.cache_latents_to_disk, cache_text_encoder_outputs=cache_te,
        cache_text_encoder_outputs_to_disk=ns.cache_text_encoder_outputs_to_disk,
        vae_batch_size=max(1, ns.vae_batch_size), text_encoder_batch_size=ns.text_encoder_batch_size,
        num_workers=max(0, ns.max_data_loader_n_workers), persistent_workers=ns.persistent_data_loader_workers,
        reg_data_dir=ns.reg_data_dir, prior_loss_weight=ns.prior_loss_weight, in_json=ns.in_json,
        dataset_class=ns.dataset_class, cache_latents=ns.cache_latents)


OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "lion")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor", "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")


def _check_optimizer(ns: argparse.Namespace) -> None:
    """Fail before any model loads: a typo here used to surface only after minutes of loading and caching."""
    from library.advanced_settings import optimizer_type_from_shortcuts

    ns.optimizer_type = optimizer_type_from_shortcuts(ns)
    kind = (ns.optimizer_type or "adamw").lower()
    if kind not in OPTIMIZERS and "." not in kind:
        raise SettingsError(f"--optimizer_type {ns.optimizer_type}: not supported by this trainer "
                            "(use AdamW, AdamW8bit, Adafactor, Lion or a dotted class path)")
    if ns.lr_scheduler not in SCHEDULERS:
        raise SettingsError(f"--lr_scheduler {ns.lr_scheduler}: not supported by this trainer "
                            f"(use one of {', '.join(SCHEDULERS)})")
    if ns.lr_scheduler == "adafactor" and kind != "adafactor":
        raise SettingsError("--lr_scheduler adafactor needs --optimizer_type Adafactor")
    if kind == "lion":
        try:
            import lion_pytorch  # noqa: F401
        except ImportError as exc:
            raise SettingsError("--optimizer_type Lion / --use_lion_optimizer needs the lion-pytorch package "
                                "(pip install -r requirements.txt)") from exc
    if ns.fused_backward_pass:
        from library.fused_backward import check_fused_backward

        check_fused_backward(ns.optimizer_type or "AdamW", ns.mixed_precision)


def _check_network_args(args: dict) -> None:
    from networks import lora_flux

    try:
        lora_flux.parse_network_args(args)
    except ValueError as exc:
        raise SettingsError(f"--network_args: {exc}") from exc


def _optimizer(ns: argparse.Namespace) -> OptimizerSettings:
    te_lr = ns.text_encoder_lr[0] if ns.text_encoder_lr else None
    return OptimizerSettings(
        type=ns.optimizer_type or "AdamW", learning_rate=ns.learning_rate, unet_lr=ns.unet_lr, text_encoder_lr=te_lr,
        args=parse_key_values(ns.optimizer_args, "--optimizer_args", literal=True), scheduler=ns.lr_scheduler,
        warmup_steps=ns.lr_warmup_steps, decay_steps=ns.lr_decay_steps, num_cycles=ns.lr_scheduler_num_cycles,
        power=ns.lr_scheduler_power, max_grad_norm=ns.max_grad_norm, scheduler_type=ns.lr_scheduler_type or "",
        scheduler_args=parse_key_values(ns.lr_scheduler_args, "--lr_scheduler_args", literal=True),
        timescale=ns.lr_scheduler_timescale, min_lr_ratio=ns.lr_scheduler_min_lr_ratio,
        fused_backward_pass=ns.fused_backward_pass)


def _save(ns: argparse.Namespace) -> SaveSettings:
    output_dir = Path(_require(ns, "output_dir", "where LoRA files and checkpoints are written"))
    name = ns.output_name or "last"
    if "/" in name or "\\" in name or name in (".", ".."):
        raise SettingsError(f"--output_name {name!r}: must be a plain file name")
    metadata = {k: getattr(ns, f"metadata_{k}") for k in ("title", "author", "description", "license", "tags")}
    return SaveSettings(
        output_dir=output_dir, output_name=name, save_precision=ns.save_precision,
        every_n_epochs=ns.save_every_n_epochs or None, every_n_steps=ns.save_every_n_steps or None,
        last_n_epochs=ns.save_last_n_epochs, last_n_epochs_state=ns.save_last_n_epochs_state,
        last_n_steps=ns.save_last_n_steps, last_n_steps_state=ns.save_last_n_steps_state,
        save_state=ns.save_state, save_state_on_train_end=ns.save_state_on_train_end, resume=ns.resume,
        no_metadata=ns.no_metadata, training_comment=ns.training_comment,
        metadata={k: v for k, v in metadata.items() if v is not None})


def _sample(ns: argparse.Namespace) -> SampleSettings:
    def positive(name):
        value = getattr(ns, name)
        if value is not None and value <= 0:
            log.warning("--%s %s is not positive: disabled", name, value)
            return None
        return value

    if ns.sample_prompts and not Path(ns.sample_prompts).is_file():
        raise SettingsError(f"--sample_prompts {ns.sample_prompts}: file not found")
    return SampleSettings(prompts=ns.sample_prompts, every_n_steps=positive("sample_every_n_steps"),
                          every_n_epochs=positive("sample_every_n_epochs"), at_first=ns.sample_at_first)


def settings_from_args(ns: argparse.Namespace) -> TrainSettings:
    from library import option_settings

    option_settings.check_model_type(ns)  # first: a Chroma run fails on this, not on what follows from it
    _check_network(ns)
    fp8_base = ns.fp8_base or ns.fp8_base_unet
    if fp8_base and ns.mixed_precision == "no":
        raise SettingsError("--fp8_base needs --mixed_precision bf16 or fp16 (fp8 weights compute in that dtype)")
    _check_optimizer(ns)
    network_args = parse_key_values(ns.network_args, "--network_args", literal=False)
    _check_network_args(network_args)
    from library import advanced_settings

    extra = advanced_settings.advanced_settings_from_args(ns)  # logging, validation, precision, continuation
    extra.update(option_settings.option_settings_from_args(ns))  # captions, regularisation, data, hub
    dim, alpha = advanced_settings.network_dim_alpha(ns)
    model = ModelSettings(
        dit_path=_require(ns, "pretrained_model_name_or_path", "the FLUX DiT (flux1-dev.sft or a diffusers folder)"),
        clip_l_path=_require(ns, "clip_l", "CLIP-L weights (clip_l.safetensors)"),
        t5xxl_path=_require(ns, "t5xxl", "T5-XXL weights (t5xxl_fp16.safetensors)"),
        ae_path=_require(ns, "ae", "autoencoder weights (ae.sft)"),
        tokenizer_cache_dir=ns.tokenizer_cache_dir, fp8_base=fp8_base, fp8_base_unet=ns.fp8_base_unet,
        disable_mmap=ns.disable_mmap_load_safetensors, t5xxl_max_token_length=ns.t5xxl_max_token_length,
        apply_t5_attn_mask=ns.apply_t5_attn_mask, weighted_captions=ns.weighted_captions)
    flow = FlowSettings(
        timestep_sampling=ns.timestep_sampling, sigmoid_scale=ns.sigmoid_scale,
        discrete_flow_shift=ns.discrete_flow_shift, model_prediction_type=ns.model_prediction_type,
        weighting_scheme=ns.weighting_scheme, logit_mean=ns.logit_mean, logit_std=ns.logit_std,
        mode_scale=ns.mode_scale, guidance_scale=ns.guidance_scale, loss_type=ns.loss_type,
        bypass_guidance=ns.bypass_flux_guidance, **option_settings.flow_options(ns))
    guards = GuardSettings(
        dataloader_timeout=ns.dataloader_timeout, block_swap_timeout=ns.block_swap_timeout,
        cache_io_timeout=ns.cache_io_timeout, sample_timeout=ns.sample_timeout, save_timeout=ns.save_timeout,
        stall_dump_timeout=ns.stall_dump_timeout, ddp_timeout_minutes=ns.ddp_timeout)
    seed = ns.seed if ns.seed is not None else 42
    if ns.seed is None:
        log.info("--seed not given: using 42 so that a resumed run can reproduce the data order")
    run = RunSettings(
        seed=seed, mixed_precision=ns.mixed_precision, gradient_checkpointing=ns.gradient_checkpointing,
        max_train_steps=ns.max_train_steps, max_train_epochs=ns.max_train_epochs,
        blocks_to_swap=_blocks_to_swap(ns), batch_size=ns.train_batch_size)
    network = NetworkSettings(module="networks.lora_flux", dim=dim, alpha=alpha, args=network_args,
                              train_unet_only=ns.network_train_unet_only, weights=ns.network_weights,
                              train_text_encoder_only=ns.network_train_text_encoder_only)
    return TrainSettings(model=model, data=_data(ns), network=network, optimizer=_optimizer(ns), flow=flow,
                         save=_save(ns), sample=_sample(ns), guards=guards, run=run, raw=dict(vars(ns)), **extra)


def total_steps(max_train_steps: int, max_train_epochs: int | None, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_epochs) with upstream's rule: epochs override steps."""
    if max_train_epochs:
        steps = max_train_epochs * batches_per_epoch
        return steps, max_train_epochs
    return max_train_steps, math.ceil(max_train_steps / max(1, batches_per_epoch))

