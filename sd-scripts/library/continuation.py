"""Upstream's manual restart path and base-weight merging: --initial_step/--initial_epoch,
--skip_until_initial_step, --save_n_epoch_ratio, --base_weights/--base_weights_multiplier.

`--resume` restores the exact position, optimizer and RNG; these flags exist for upstream
compatibility (restarting from a LoRA file without a state folder). The step counter stays absolute
here, so file names, logs and the LR schedule position agree with the step shown.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from library.settings import SettingsError

log = logging.getLogger(__name__)


def plan_run(session):
    """After the dataset is known, before any model loads: --save_n_epoch_ratio and the initial step bound.
    Returns the settings to train with (a new object when --save_n_epoch_ratio set the save cadence)."""
    settings, data = session.settings, session.data
    c = settings.continuation
    if c.save_n_epoch_ratio:
        every = math.floor(data.num_epochs / c.save_n_epoch_ratio) or 1
        print(f"--save_n_epoch_ratio {c.save_n_epoch_ratio}: saving every {every} epochs")
        settings = dataclasses.replace(settings, save=dataclasses.replace(settings.save, every_n_epochs=every))
    step = initial_step(session)
    if step is not None and step >= data.max_train_steps:
        flag = "--initial_step" if c.initial_step is not None else "--initial_epoch"
        raise SettingsError(f"{flag}: starting at step {step} leaves nothing to train "
                            f"(max_train_steps is {data.max_train_steps})")
    return settings


def initial_step(session) -> int | None:
    c = session.settings.continuation
    if c.initial_step is not None:
        return c.initial_step
    if c.initial_epoch is not None:
        return (c.initial_epoch - 1) * session.data.batches_per_epoch
    return None


def apply_initial_position(session) -> None:
    """After --resume (which it overrides, as upstream): start at the initial step or its epoch's start."""
    step = initial_step(session)
    if step is None:
        return
    pos, per_epoch = session.pos, session.data.batches_per_epoch
    if pos.step:
        log.warning("--initial_step/--initial_epoch: the step of the resumed state (%d) is ignored", pos.step)
    if session.settings.continuation.skip_until_initial_step:
        pos.epoch, pos.batch_in_epoch = divmod(step, per_epoch)
        pos.step = step
    else:  # upstream without --skip_until_initial_step: only whole epochs are skipped
        pos.epoch, pos.batch_in_epoch = step // per_epoch, 0
        pos.step = pos.epoch * per_epoch
    print(f"starting at step {pos.step} (epoch {pos.epoch + 1}, batch {pos.batch_in_epoch}); prefer --resume "
          "with a state folder: it also restores the optimizer, LR schedule and random state")


@torch.no_grad()
def merge_base_weights(session) -> None:
    """--base_weights: add each LoRA (times its multiplier, default 1) into the base model's weights."""
    from networks import lora_flux

    c, models = session.settings.continuation, session.models
    for index, path in enumerate(c.base_weights):
        multiplier = c.base_weights_multipliers[index] if index < len(c.base_weights_multipliers) else 1.0
        print(f"merging module: {path} with multiplier {multiplier}")
        network, _ = lora_flux.create_network_from_weights(multiplier, path, None, [models.clip_l, None],
                                                           models.transformer)
        for name in network.unet_module_names + network.te_module_names:
            lora = network.get_submodule(name)
            delta = (lora.lora_up.weight.float() @ lora.lora_down.weight.float()) * lora.scale
            for target in network._targets[name]:
                weight = target.module.weight
                merged = weight.float() + delta[target.row_start:target.row_end].to(weight.device)
                weight.copy_(merged.to(weight.dtype))
    if c.base_weights:
        print(f"all weights merged: {', '.join(c.base_weights)}")
