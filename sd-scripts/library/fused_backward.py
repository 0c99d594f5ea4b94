"""--fused_backward_pass: each LoRA parameter is stepped as soon as its gradient is complete.

- `check_fused_backward`: the preflight refusals (optimizers whose update is not per-parameter, fp16 loss
  scaling, more than one process), raised before any model loads.
- `FusedBackward`: a post-accumulate-grad hook per trainable parameter. On the micro-step where gradients
  sync, the hook clips that tensor alone to --max_grad_norm (upstream's per-tensor rule), runs the optimizer
  on that one parameter and frees its gradient, so the gradients of all LoRA parameters never exist at once.
- The loop still steps the LR scheduler and --scale_weight_norms once per optimizer step; it skips its own
  clip and optimizer.step when `Optimization.fused` is set (library.train_loop.training_step).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

import torch

from library.settings import SettingsError

log = logging.getLogger(__name__)

# Optimizer classes (lower-case class name) whose update of a parameter reads only that parameter, its gradient
# and its own state, so stepping them one parameter at a time is the same as one step over all of them.
# Prodigy, D-Adaptation and the schedule-free optimizers keep estimates shared by all parameters (d, the
# running sums): stepping them per parameter would change their math, so they are refused.
PER_PARAMETER_OPTIMIZERS = frozenset({
    "adamw", "adam", "sgd", "adagrad", "adamax", "nadam", "radam", "rmsprop", "rprop", "asgd",  # torch.optim
    "adamw8bit", "adam8bit", "lion8bit", "pagedadamw8bit", "pagedadam8bit", "pagedlion8bit",  # bitsandbytes
    "pagedadamw", "pagedadam", "pagedlion", "lion",  # bitsandbytes 32-bit and lion-pytorch
    "adafactor",  # transformers
})


def optimizer_class_name(optimizer_type: str) -> str:
    """`torch.optim.SGD` -> `sgd`; `AdamW8bit` -> `adamw8bit` (the name PER_PARAMETER_OPTIMIZERS is keyed by)."""
    return (optimizer_type or "AdamW").rpartition(".")[2].lower()


def check_fused_backward(optimizer_type: str, mixed_precision: str, world_size: int | None = None) -> None:
    """Refuse what per-parameter stepping cannot do; SettingsError (exit 2) naming both flags."""
    name = optimizer_class_name(optimizer_type)
    if name not in PER_PARAMETER_OPTIMIZERS:
        raise SettingsError(
            f"--fused_backward_pass with --optimizer_type {optimizer_type}: this optimizer's update is not "
            "per-parameter (its state is shared by all parameters), so it cannot step one parameter at a time; "
            "use AdamW, AdamW8bit, Adafactor, Lion or a torch.optim per-parameter optimizer such as "
            "torch.optim.SGD, or drop --fused_backward_pass")
    if mixed_precision == "fp16":
        # Loss scaling decides whether to skip a step only once every gradient is known, after the hooks ran.
        raise SettingsError("--fused_backward_pass with --mixed_precision fp16: fp16 loss scaling must see all "
                            "gradients before any step; use --mixed_precision bf16 (or no)")
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        # The hooks would need one all-reduce per tensor in the same order on every process, and a LoRA module
        # skipped by module_dropout on one process only would leave the others waiting: not done here.
        raise SettingsError(f"--fused_backward_pass with {world} processes (WORLD_SIZE={world}): supported with "
                            "one process only; launch one process or drop --fused_backward_pass")


def _inner(optimizer):
    """The torch optimizer itself under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def step_one_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor, group_index: int) -> None:
    """One optimizer step of `param` alone, with its group's LR and options and its own state.

    Every group's list is narrowed for the call (the group dicts stay the same objects, so the LR scheduler's
    values are used) and restored after, so the optimizer's state_dict and checkpoints are unchanged.
    """
    groups = optimizer.param_groups
    saved = [group["params"] for group in groups]
    try:
        for i, group in enumerate(groups):
            group["params"] = [param] if i == group_index else []
        optimizer.step()
    finally:
        for group, params in zip(groups, saved):
            group["params"] = params


class FusedBackward:
    """The per-parameter optimizer steps run from gradient hooks (see the module docstring)."""

    def __init__(self, optimizer, params: Iterable[torch.Tensor], *, max_grad_norm: float,
                 should_step: Callable[[], bool] = lambda: True):
        self.optimizer = _inner(optimizer)
        self.max_grad_norm = max_grad_norm
        self.should_step = should_step  # accelerate's sync_gradients: False on accumulation micro-steps
        self.optimizer_steps = 0  # completed optimizer steps (end_step calls that stepped something)
        self.parameter_steps = 0  # single-parameter steps in all
        self._stepped: set[int] = set()  # ids of the parameters stepped in the current optimizer step
        group_of = {id(p): i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        self._handles = []
        for param in params:
            if id(param) not in group_of:
                raise ValueError("--fused_backward_pass: a trainable parameter is not in the optimizer")
            hook = self._make_hook(group_of[id(param)])
            self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def _make_hook(self, group_index: int):
        def hook(param: torch.Tensor) -> None:
            if not self.should_step():
                return  # accumulation micro-step: the gradient stays and the next backward adds to it
            if id(param) in self._stepped:
                # e.g. a parameter used in two reentrant checkpoint segments: a second step would use half a gradient
                raise RuntimeError("--fused_backward_pass: a parameter received its gradient twice in one step")
            self._stepped.add(id(param))
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)  # this tensor alone, as upstream
            with torch.no_grad():
                step_one_parameter(self.optimizer, param, group_index)
            param.grad = None  # freed now: the point of the flag
            self.parameter_steps += 1
        return hook

    def end_step(self) -> int:
        """After backward, where the loop would call optimizer.step(); returns how many parameters stepped."""
        stepped = len(self._stepped)
        if stepped:
            self.optimizer_steps += 1
        self._stepped.clear()
        return stepped

    def remove(self) -> None:
        """Unregister the hooks (the optimizer is then stepped the usual way again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def install(session, optimizer, params: list) -> FusedBackward | None:
    """Called by the trainer after the optimizer exists; None when --fused_backward_pass is off."""
    settings = session.settings.optimizer
    if not settings.fused_backward_pass:
        return None
    check_fused_backward(settings.type, session.settings.run.mixed_precision, session.world)  # the launch may differ
    accelerator = session.accelerator
    fused = FusedBackward(optimizer, params, max_grad_norm=settings.max_grad_norm,
                          should_step=lambda: accelerator.sync_gradients)
    print(f"fused backward pass: {len(params)} LoRA tensors are stepped during backward"
          + (f", each clipped to norm {settings.max_grad_norm}" if settings.max_grad_norm else ""))
    return fused
