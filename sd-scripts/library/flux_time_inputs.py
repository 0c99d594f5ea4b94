"""Float32 timestep and guidance values for diffusers' FLUX transformer under bf16/fp16.

diffusers' `FluxTransformer2DModel.forward` casts `timestep` and `guidance` to the model's dtype
before multiplying by 1000, so under bf16 `--guidance_scale 3.5` reaches the sinusoidal embedding
as 3504 and every timestep is rounded the same way. BFL's reference and upstream sd-scripts train
with `1000 * t` and `1000 * guidance` in float32. `keep_time_inputs_float32` restores that with two
forward hooks; the weights, the state dict and every other layer are untouched.

`allow_guidance_bypass` (--bypass_flux_guidance) lets a call with `guidance=None` run as if the model had no
guidance embedder (timestep + pooled text only), while calls with guidance (sampling) are unchanged.
"""
from __future__ import annotations

import inspect

import torch

SCALE = 1000.0  # callers pass t in [0, 1] and the plain guidance scale; the embeddings want both x1000
_INSTALLED = "_fluxtrain_float32_time_inputs"


def _scaled(value) -> torch.Tensor | None:
    if value is None:
        return None
    return torch.as_tensor(value).float() * SCALE


def keep_time_inputs_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model` (a FluxTransformer2DModel) embed `timestep * 1000` and `guidance * 1000` computed
    in float32 from the values the caller passed. Idempotent; returns the model."""
    if getattr(model, _INSTALLED, False):
        return model
    signature = inspect.signature(model.forward)
    pending: dict[str, torch.Tensor | None] = {}

    def remember_inputs(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        pending.clear()
        if bound.get("timestep") is not None:
            pending["timestep"] = _scaled(bound["timestep"])
            pending["guidance"] = _scaled(bound.get("guidance"))
        return None

    def substitute(module, args):
        # diffusers calls time_text_embed(timestep, pooled) or (timestep, guidance, pooled) with the
        # values it rounded to the model dtype; swap in the float32 ones computed from the caller's input.
        if "timestep" not in pending:
            return None  # called outside the transformer's forward: leave it alone
        timestep, guidance = pending.pop("timestep"), pending.pop("guidance", None)
        if len(args) == 3 and guidance is not None:
            return (timestep.to(args[0].device), guidance.to(args[1].device), args[2])
        if len(args) == 2:
            return (timestep.to(args[0].device), args[1])
        return None

    model.register_forward_pre_hook(remember_inputs, with_kwargs=True)
    model.time_text_embed.register_forward_pre_hook(substitute)
    setattr(model, _INSTALLED, True)
    return model


_BYPASS = "_fluxtrain_guidance_bypass"


def allow_guidance_bypass(model: torch.nn.Module) -> bool:
    """Let `model(..., guidance=None)` skip the guidance embedding. False (nothing done) when the model has no
    guidance embedder (FLUX.1 schnell-like: there is nothing to bypass). Idempotent; state dict untouched."""
    embed = model.time_text_embed
    if not hasattr(embed, "guidance_embedder"):
        return False
    if getattr(embed, _BYPASS, False):
        return True
    with_guidance = embed.forward

    def forward(timestep, *rest):
        # diffusers calls (timestep, pooled) when guidance is None, (timestep, guidance, pooled) otherwise
        if len(rest) != 1:
            return with_guidance(timestep, *rest)
        (pooled,) = rest
        timestep_emb = embed.timestep_embedder(embed.time_proj(timestep).to(dtype=pooled.dtype))
        return timestep_emb + embed.text_embedder(pooled)

    embed.forward = forward  # an instance attribute: hooks (the float32 substitute above) still run
    setattr(embed, _BYPASS, True)
    return True
