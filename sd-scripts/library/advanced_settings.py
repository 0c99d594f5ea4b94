"""Checks and typed settings for the logging, validation, precision and continuation flags.

`settings.settings_from_args` calls `advanced_settings_from_args` once; every bad value raises
SettingsError naming the flag before any model loads. The dataclasses themselves live in
`library.settings` beside the others.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import tomllib
from pathlib import Path

from library.settings import (ContinuationSettings, PrecisionSettings, SettingsError, TrackingSettings,
                              ValidationSettings)

log = logging.getLogger(__name__)
DEFAULT_TRACKER_NAME = "network_train"  # upstream's name for network training runs


def optimizer_type_from_shortcuts(ns: argparse.Namespace) -> str:
    """--use_8bit_adam / --use_lion_optimizer as upstream maps them (and refuses them combined)."""
    kind = ns.optimizer_type or ""
    if ns.use_8bit_adam and ns.use_lion_optimizer:
        raise SettingsError("--use_8bit_adam and --use_lion_optimizer: give only one of them")
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(ns, flag):
            if kind:
                raise SettingsError(f"--{flag} and --optimizer_type {kind}: give only one of them")
            return name
    return kind


def _positive(ns: argparse.Namespace, name: str, minimum: int = 1) -> int | None:
    value = getattr(ns, name)
    if value is not None and value < minimum:
        raise SettingsError(f"--{name} {value}: must be {minimum} or more")
    return value


def _tracking(ns: argparse.Namespace) -> TrackingSettings:
    log_with = ns.log_with or ("tensorboard" if ns.logging_dir else None)
    trackers = () if log_with is None else (("tensorboard", "wandb") if log_with == "all" else (log_with,))
    if "tensorboard" in trackers:
        if not ns.logging_dir:
            raise SettingsError(f"--log_with {ns.log_with} needs --logging_dir (where the TensorBoard logs go)")
        if importlib.util.find_spec("tensorboard") is None:
            raise SettingsError("--logging_dir/--log_with tensorboard needs the tensorboard package "
                                "(pip install -r requirements.txt)")
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        raise SettingsError(f"--log_with {ns.log_with} needs the wandb package (pip install wandb), "
                            "or use --log_with tensorboard")
    config: dict = {}
    if ns.wandb_run_name:
        config["wandb"] = {"name": ns.wandb_run_name}
    if ns.log_tracker_config:
        path = Path(ns.log_tracker_config)
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))  # replaces the above, as upstream
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"--log_tracker_config {path}: cannot read it as TOML ({exc})") from exc
    if not trackers:
        for flag in ("log_prefix", "log_tracker_name", "wandb_run_name", "log_tracker_config", "wandb_api_key"):
            if getattr(ns, flag):
                log.warning("--%s has no effect without --logging_dir or --log_with", flag)
    return TrackingSettings(log_with=trackers, logging_dir=ns.logging_dir, log_prefix=ns.log_prefix or "",
                            tracker_name=ns.log_tracker_name or DEFAULT_TRACKER_NAME,
                            wandb_run_name=ns.wandb_run_name, tracker_config=config,
                            wandb_api_key=ns.wandb_api_key, log_config=ns.log_config)


def _validation(ns: argparse.Namespace, seed: int) -> ValidationSettings:
    split = ns.validation_split or 0.0
    if not 0.0 <= split < 1.0:
        raise SettingsError(f"--validation_split {split}: must be at least 0 and below 1 (a fraction of the images)")
    every_steps = _positive(ns, "validate_every_n_steps")
    every_epochs = _positive(ns, "validate_every_n_epochs")
    max_steps = _positive(ns, "max_validation_steps")
    # with a dataset config, its validation_split keys may turn validation on (library.validation warns then)
    if not split and not ns.dataset_config and (every_steps or every_epochs or max_steps or
                                                ns.validation_seed is not None):
        log.warning("validation flags have no effect without --validation_split")
    return ValidationSettings(split=split, seed=ns.validation_seed if ns.validation_seed is not None else seed,
                              every_n_steps=every_steps, every_n_epochs=every_epochs, max_steps=max_steps)


# Upstream flags accepted for compatibility that change nothing here: (flags, why). One warning per row, naming the
# first flag of the row that was given, so a recipe passing both attention flags sees one line, not two.
_NO_EFFECT_FLAGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("xformers", "mem_eff_attn"), "FLUX attention always uses torch SDPA here"),
    (("ddp_gradient_as_bucket_view",), "there is no DDP wrapper here: the trainer averages the LoRA gradients itself"),
    (("ddp_static_graph",), "there is no DDP wrapper here: the trainer averages the LoRA gradients itself"),
)


def warn_no_effect_flags(ns: argparse.Namespace) -> list[str]:
    """Warn once per accepted-but-ineffective upstream flag (row of _NO_EFFECT_FLAGS); returns the messages."""
    messages = []
    for flags, why in _NO_EFFECT_FLAGS:
        given = [flag for flag in flags if getattr(ns, flag, False)]
        if given:
            messages.append(f"--{given[0]}: accepted, no effect: {why}")
            log.warning("%s", messages[-1])
    return messages


def _precision(ns: argparse.Namespace) -> PrecisionSettings:
    if ns.full_bf16 and ns.full_fp16:
        raise SettingsError("--full_bf16 and --full_fp16: give only one of them")
    for flag, mode in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if getattr(ns, flag) and ns.mixed_precision != mode:
            raise SettingsError(f"--{flag} needs --mixed_precision {mode} (it is {ns.mixed_precision})")
    if ns.cpu_offload_checkpointing:
        if ns.blocks_to_swap or ns.split_mode:
            raise SettingsError("--cpu_offload_checkpointing cannot be combined with --blocks_to_swap/--split_mode "
                                "(as upstream): use one of them")
        if not ns.gradient_checkpointing:
            log.warning("--cpu_offload_checkpointing has no effect without --gradient_checkpointing")
    if ns.torch_compile:
        import torch._dynamo

        if ns.dynamo_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise SettingsError(f"--dynamo_backend {ns.dynamo_backend}: this torch has no such backend "
                                f"(available: {', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
        import shutil

        import torch

        if ns.dynamo_backend == "inductor" and not torch.cuda.is_available() and not shutil.which("c++"):
            raise SettingsError("--dynamo_backend inductor needs a C++ compiler on a CPU-only machine "
                                "(none found); use --dynamo_backend eager")
    return PrecisionSettings(full_bf16=ns.full_bf16, full_fp16=ns.full_fp16,
                             cpu_offload_checkpointing=ns.cpu_offload_checkpointing,
                             torch_compile=ns.torch_compile, dynamo_backend=ns.dynamo_backend)


def _continuation(ns: argparse.Namespace) -> ContinuationSettings:
    initial_step = _positive(ns, "initial_step", minimum=0)
    initial_epoch = _positive(ns, "initial_epoch")
    if initial_step is not None and initial_epoch is not None:
        log.warning("--initial_step and --initial_epoch: --initial_step wins (as upstream)")
    if ns.skip_until_initial_step and initial_step is None and initial_epoch is None:
        log.warning("--skip_until_initial_step has no effect without --initial_step or --initial_epoch")
    weights = tuple(ns.base_weights or ())
    for path in weights:
        if not Path(path).is_file():
            raise SettingsError(f"--base_weights {path}: file not found")
    multipliers = tuple(ns.base_weights_multiplier or ())
    if len(multipliers) > len(weights):
        raise SettingsError(f"--base_weights_multiplier: {len(multipliers)} values for {len(weights)} "
                            "--base_weights files")
    return ContinuationSettings(initial_step=initial_step, initial_epoch=initial_epoch,
                                skip_until_initial_step=ns.skip_until_initial_step, base_weights=weights,
                                base_weights_multipliers=multipliers,
                                save_n_epoch_ratio=_positive(ns, "save_n_epoch_ratio"))


def network_dim_alpha(ns: argparse.Namespace) -> tuple[int, float]:
    """--network_dim/--network_alpha, or with --dim_from_weights the rank and alpha stored in --network_weights."""
    if not ns.dim_from_weights:
        return (ns.network_dim if ns.network_dim is not None else 4), ns.network_alpha
    if not ns.network_weights:
        raise SettingsError("--dim_from_weights needs --network_weights (the file to take the rank from)")
    from safetensors import safe_open

    try:
        with safe_open(ns.network_weights, framework="pt") as handle:
            keys = list(handle.keys())
            ranks = {handle.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")}
            alphas = {float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    except (OSError, ValueError, RuntimeError) as exc:
        raise SettingsError(f"--network_weights {ns.network_weights}: cannot read it ({exc})") from exc
    if len(ranks) != 1:
        raise SettingsError(f"--dim_from_weights: {ns.network_weights} has {len(ranks) or 'no'} different ranks "
                            f"({sorted(ranks)}); this trainer needs one rank for all modules")
    rank = ranks.pop()
    alpha = alphas.pop() if len(alphas) == 1 else float(rank)
    print(f"--dim_from_weights: network_dim {rank}, network_alpha {alpha} from {ns.network_weights}")
    return rank, alpha


def advanced_settings_from_args(ns: argparse.Namespace) -> dict:
    """The TrainSettings fields this module owns, as keyword arguments."""
    seed = ns.seed if ns.seed is not None else 42
    warn_no_effect_flags(ns)
    return {"tracking": _tracking(ns), "validation": _validation(ns, seed), "precision": _precision(ns),
            "continuation": _continuation(ns)}
