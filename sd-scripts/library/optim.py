"""Optimizers and LR schedulers named as upstream's --optimizer_type / --lr_scheduler.

AdamW (torch), AdamW8bit (bitsandbytes), Adafactor (transformers) and any dotted class
path; schedulers come from diffusers' `get_scheduler` (the same family upstream wraps),
plus transformers' Adafactor schedule for `adafactor`. Heavy libraries load lazily.
"""
from __future__ import annotations

import importlib
import logging

import torch

from library.settings import OptimizerSettings, SettingsError

log = logging.getLogger(__name__)


def _adafactor(params, lr: float, args: dict):
    from transformers.optimization import Adafactor

    args = dict(args)
    args.setdefault("relative_step", True)
    args.setdefault("scale_parameter", True)
    args.setdefault("warmup_init", False)
    if args["relative_step"]:
        # Upstream: relative_step computes its own LR; the given LR only seeds the schedule.
        log.info("Adafactor relative_step=True: learning rate is computed by the optimizer")
        return Adafactor(params, lr=None, **args)
    return Adafactor(params, lr=lr, **args)


def create_optimizer(settings: OptimizerSettings, param_groups: list[dict]) -> torch.optim.Optimizer:
    kind = settings.type.lower()
    lr = settings.learning_rate
    args = dict(settings.args)
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, **args)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SettingsError("--optimizer_type AdamW8bit needs bitsandbytes (pip install bitsandbytes)") from exc
        return bnb.optim.AdamW8bit(param_groups, lr=lr, **args)
    if kind == "adafactor":
        return _adafactor(param_groups, lr, args)
    if kind == "lion":  # --use_lion_optimizer maps here, as upstream
        import lion_pytorch

        return lion_pytorch.Lion(param_groups, lr=lr, **args)
    if "." in settings.type:
        module_name, _, class_name = settings.type.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise SettingsError(f"--optimizer_type {settings.type}: cannot import it ({exc})") from exc
        return cls(param_groups, lr=lr, **args)
    raise SettingsError(f"--optimizer_type {settings.type}: expected AdamW, AdamW8bit, Adafactor "
                        "or a dotted class path")


def describe_optimizer(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> str:
    """`ss_optimizer`: the class path plus its args, as upstream."""
    cls = type(optimizer)
    text = f"{cls.__module__}.{cls.__name__}"
    if settings.args:
        text += "(" + ",".join(f"{k}={v}" for k, v in settings.args.items()) + ")"
    return text


def _steps(value: float, total: int) -> int:
    """Warmup/decay given as an int count or as a float ratio of the total (upstream)."""
    if isinstance(value, float) and value < 1:
        return int(value * total)
    return int(value)


def create_scheduler(settings: OptimizerSettings, optimizer, total_steps: int, num_processes: int = 1):
    """An LR scheduler stepped once per optimizer step on every process.

    accelerate's scheduler wrapper advances `num_processes` times per call, so the counts
    are scaled the same way (upstream does the same).
    """
    if settings.scheduler_type:
        return _scheduler_from_class(settings, optimizer)
    name = settings.scheduler
    if name in _TRANSFORMERS_SCHEDULES:
        return _transformers_schedule(settings, optimizer, total_steps * num_processes,
                                      _steps(settings.warmup_steps, total_steps) * num_processes,
                                      _steps(settings.decay_steps, total_steps) * num_processes)
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=settings.learning_rate)
    from diffusers.optimization import SchedulerType, get_scheduler

    valid = {s.value for s in SchedulerType}
    if name not in valid:
        raise SettingsError(f"--lr_scheduler {name}: expected one of {', '.join(sorted(valid | {'adafactor'}))}")
    warmup = _steps(settings.warmup_steps, total_steps) * num_processes
    kwargs = {"num_warmup_steps": warmup, "num_training_steps": total_steps * num_processes}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = settings.num_cycles
    if name == "polynomial":
        kwargs["power"] = settings.power
    if name in ("constant",):
        kwargs = {}
    elif name == "constant_with_warmup":
        kwargs.pop("num_training_steps")
    if settings.scheduler_args:  # --lr_scheduler_args reach every scheduler, as upstream
        return _with_extra_args(name, optimizer, kwargs, settings.scheduler_args)
    return get_scheduler(name, optimizer, **kwargs)


_TRANSFORMERS_SCHEDULES = ("cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")


def _with_extra_args(name: str, optimizer, kwargs: dict, extra: dict):
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)](optimizer, **kwargs, **extra)
    except TypeError as exc:
        raise SettingsError(f"--lr_scheduler_args {extra}: not accepted by --lr_scheduler {name} ({exc})") from exc


def _transformers_schedule(settings: OptimizerSettings, optimizer, total: int, warmup: int, decay: int):
    """The schedules upstream takes from transformers, with its argument mapping (num_cycles halved)."""
    from transformers import optimization as tro

    name, extra = settings.scheduler, dict(settings.scheduler_args)
    if name == "cosine_with_min_lr":
        return tro.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=settings.num_cycles / 2,
            min_lr_rate=settings.min_lr_ratio, **extra)
    if name == "warmup_stable_decay":
        return tro.get_wsd_schedule(
            optimizer, num_warmup_steps=warmup, num_stable_steps=total - warmup - decay, num_decay_steps=decay,
            num_cycles=settings.num_cycles / 2, min_lr_ratio=settings.min_lr_ratio or 0.0, **extra)
    return tro.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup, timescale=settings.timescale, **extra)


def _scheduler_from_class(settings: OptimizerSettings, optimizer):
    """--lr_scheduler_type: a torch.optim.lr_scheduler class name or a dotted path, built with --lr_scheduler_args."""
    name = settings.scheduler_type
    if settings.warmup_steps:
        raise SettingsError(f"--lr_scheduler_type {name} does not use --lr_warmup_steps; set it to 0")
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"--lr_scheduler_type {name}: cannot import it ({exc})") from exc
    try:
        return cls(optimizer, **settings.scheduler_args)
    except TypeError as exc:
        raise SettingsError(f"--lr_scheduler_type {name} with --lr_scheduler_args {settings.scheduler_args}: "
                            f"{exc}") from exc
