"""Flow-matching pieces of FLUX LoRA training with upstream sd-scripts' meanings.

Timestep sampling (`--timestep_sampling` sigma/uniform/sigmoid/shift/flux_shift), the
`--weighting_scheme` density and loss weighting, `--model_prediction_type` and the
`--loss_type` losses. Pure tensor functions: every random draw takes an explicit
generator, which is what makes a resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
HUBER_C = 0.1  # upstream's default --huber_c


@dataclass
class NoisedBatch:
    noisy: torch.Tensor      # (B, C, H, W) model input
    timesteps: torch.Tensor  # (B,) in [0, 1000]
    sigmas: torch.Tensor     # (B, 1, 1, 1)


def _time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def _flux_mu(image_seq_len: int) -> float:
    # Linear in sequence length between FLUX's base (256 tokens, 0.5) and max (4096, 1.15) shifts.
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * image_seq_len + (0.5 - slope * 256)


def density_samples(scheme: str, batch: int, *, logit_mean: float, logit_std: float, mode_scale: float,
                    generator: torch.Generator) -> torch.Tensor:
    """u in [0, 1) drawn from the density named by --weighting_scheme (SD3's recipe)."""
    if scheme == "logit_normal":
        u = torch.normal(logit_mean, logit_std, size=(batch,), generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(batch, generator=generator)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shifted_sigmas(shift: float) -> torch.Tensor:
    """The discrete sigma table of FlowMatchEulerDiscreteScheduler(shift=...), ascending index = descending sigma."""
    sigmas = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_noised(latents: torch.Tensor, noise: torch.Tensor, flow, generator: torch.Generator) -> NoisedBatch:
    """Draw timesteps per --timestep_sampling and mix latents with noise: x_t = (1 - s) x0 + s n."""
    batch = latents.shape[0]
    kind = flow.timestep_sampling
    if kind == "sigma":
        u = density_samples(flow.weighting_scheme, batch, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
                            mode_scale=flow.mode_scale, generator=generator)
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        sig = shifted_sigmas(flow.discrete_flow_shift)[indices]
    else:
        if kind == "uniform":
            t = torch.rand(batch, generator=generator)
        else:
            t = torch.sigmoid(flow.sigmoid_scale * torch.randn(batch, generator=generator))
        if kind == "shift":
            shift = flow.discrete_flow_shift
            t = (t * shift) / (1 + (shift - 1) * t)
        elif kind == "flux_shift":
            seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
            t = _time_shift(_flux_mu(seq_len), t)
        sig = t
    sigmas = sig.to(latents.device, torch.float32).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents.float() + sigmas * noise.float()
    return NoisedBatch(noisy=noisy.to(latents.dtype), timesteps=sigmas.view(-1) * NUM_TRAIN_TIMESTEPS, sigmas=sigmas)


def noised_at(latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> NoisedBatch:
    """The batch noised at one fixed sigma (validation): x_t = (1 - s) x0 + s n, timestep = s * 1000."""
    sigmas = torch.full((latents.shape[0], 1, 1, 1), float(sigma), device=latents.device, dtype=torch.float32)
    noisy = (1.0 - sigmas) * latents.float() + sigmas * noise.float()
    return NoisedBatch(noisy=noisy.to(latents.dtype), timesteps=sigmas.view(-1) * NUM_TRAIN_TIMESTEPS, sigmas=sigmas)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas ** 2
        return (2 / (math.pi * bot)).float()
    return None


def apply_prediction_type(pred: torch.Tensor, noised: NoisedBatch, flow) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upstream's --model_prediction_type: raw, additive, sigma_scaled (which also weights the loss)."""
    if flow.model_prediction_type == "raw":
        return pred, None
    if flow.model_prediction_type == "additive":
        return pred + noised.noisy, None
    scaled = pred * (-noised.sigmas) + noised.noisy
    return scaled, loss_weighting(flow.weighting_scheme, noised.sigmas)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
              weighting: torch.Tensor | None = None) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        loss = (pred - target) ** 2
    elif loss_type == "l1":
        loss = (pred - target).abs()
    elif loss_type == "huber":
        loss = 2 * HUBER_C * (torch.sqrt((pred - target) ** 2 + HUBER_C ** 2) - HUBER_C)
    elif loss_type == "smooth_l1":
        loss = 2 * (torch.sqrt((pred - target) ** 2 + HUBER_C ** 2) - HUBER_C)
    else:
        raise ValueError(f"--loss_type {loss_type}: expected l1, l2, huber or smooth_l1")
    if weighting is not None:
        loss = loss * weighting
    return loss.mean(dim=(1, 2, 3)).mean()
