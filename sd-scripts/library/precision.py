"""--full_bf16/--full_fp16, --cpu_offload_checkpointing and --torch_compile, as upstream means them.

- full_bf16/full_fp16: the LoRA weights (so their gradients and the optimizer state) are held in the
  mixed-precision dtype instead of float32; for fp16 the grad scaler is allowed to unscale fp16 gradients,
  as upstream patches accelerate.
- cpu_offload_checkpointing: tensors autograd keeps for backward (with gradient checkpointing: the block
  inputs) are moved to CPU memory during the forward and back for the backward.
- torch_compile: each transformer block is compiled in place with --dynamo_backend (its structure, names
  and LoRA hooks stay as they are; upstream compiles through accelerate's dynamo plugin).
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)
OFFLOAD_STATS = {"tensors": 0, "bytes": 0}  # what --cpu_offload_checkpointing moved (tests, benchmark)


def prepare_network(session, network) -> None:
    """After the LoRA network exists and before the optimizer is built."""
    p = session.settings.precision
    if p.full_bf16 or p.full_fp16:
        print(f"enable full {'bf16' if p.full_bf16 else 'fp16'} training.")
        network.to(session.weight_dtype)
    if p.full_fp16:
        _allow_fp16_unscale(session.accelerator)
    if p.torch_compile:
        compile_blocks(session.models.transformer, p.dynamo_backend)


def _allow_fp16_unscale(accelerator) -> None:
    """torch's GradScaler refuses fp16 gradients; with --full_fp16 they are fp16 by design (upstream's patch)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        log.warning("--full_fp16: no gradient scaler on this device; fp16 gradients are used unscaled")
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def compile_blocks(transformer: torch.nn.Module, backend: str) -> int:
    """torch.compile every double and single block in place; returns how many were compiled."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        block.compile(backend=backend)
    print(f"torch.compile: {len(blocks)} transformer blocks with backend {backend}")
    return len(blocks)


def _pack(tensor: torch.Tensor):
    if tensor.device.type == "cpu":
        return tensor.device, tensor
    OFFLOAD_STATS["tensors"] += 1
    OFFLOAD_STATS["bytes"] += tensor.numel() * tensor.element_size()
    return tensor.device, tensor.to("cpu", non_blocking=True)


def _unpack(packed) -> torch.Tensor:
    device, tensor = packed
    return tensor.to(device, non_blocking=True)


def activation_offload(session):
    """The context the transformer's forward runs in: offloads saved activations with the flag, else nothing."""
    p = session.settings.precision
    if not (p.cpu_offload_checkpointing and session.settings.run.gradient_checkpointing and torch.is_grad_enabled()):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
