"""Flow-matching pieces of FLUX LoRA training with upstream sd-scripts' meanings.

Timestep sampling (`--timestep_sampling` sigma/uniform/sigmoid/shift/flux_shift), the
`--weighting_scheme` density and loss weighting, `--model_prediction_type` and the
`--loss_type` losses, plus upstream's `--noise_offset` (with `--adaptive_noise_scale`),
`--multires_noise_iterations`/`--multires_noise_discount`, `--ip_noise_gamma` (and their random strengths),
`--min_timestep`/`--max_timestep` and the `--huber_schedule` threshold. Pure tensor functions: every random
draw takes an explicit generator, which is what makes a resumed run bit-identical to an uninterrupted one.
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


def flux_mu(image_seq_len: int) -> float:
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


def training_noise(shape: tuple, flow, generator: torch.Generator, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian noise plus upstream's noise options, in upstream's order (its SD path; see the README for FLUX):

    --noise_offset: a per-(sample, channel) constant offset * N(0, 1), the strength drawn from U(0, noise_offset)
    once per step with --noise_offset_random_strength; --adaptive_noise_scale adds scale * |mean of the latent
    channel| to that strength (clamped at 0). Then --multires_noise_iterations: pyramid noise (see pyramid_noise).
    Every draw comes from `generator` (the per-step one), so a resumed run draws the same noise."""
    noise = torch.randn(shape, generator=generator)
    offset = getattr(flow, "noise_offset", 0.0)
    if offset:
        strength = torch.rand(1, generator=generator) * offset if flow.noise_offset_random_strength else offset
        adaptive = getattr(flow, "adaptive_noise_scale", None)
        if adaptive is not None:
            if latents is None:
                raise ValueError("training_noise: --adaptive_noise_scale needs the latents")
            channel_mean = latents.detach().float().cpu().mean(dim=(2, 3), keepdim=True).abs()
            strength = torch.clamp(strength + adaptive * channel_mean, min=0.0)
        noise = noise + strength * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    iterations = getattr(flow, "multires_noise_iterations", 0)
    if iterations:
        noise = pyramid_noise(noise, iterations, flow.multires_noise_discount, generator)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Upstream's multi-resolution ("pyramid") noise: for i = 0..iterations-1 draw a ratio r ~ U(2, 4), add
    N(0, 1) noise of size max(1, int(H / r**i)) x max(1, int(W / r**i)) upsampled bilinearly to H x W, times
    discount**i; stop after a level with a side of 1; finally divide by the standard deviation of the whole
    batch. Upstream draws r with Python's `random` and the noise from torch's global RNG; here both come from
    the per-step generator (same distributions, reproducible on resume)."""
    batch, channels, height, width = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        h, w = max(1, int(height / r ** i)), max(1, int(width / r ** i))
        level = torch.randn((batch, channels, h, w), generator=generator)
        out = out + torch.nn.functional.interpolate(level, size=(height, width), mode="bilinear") * discount ** i
        if h == 1 or w == 1:
            break
    return out / out.std()


def timestep_range(flow) -> tuple[float, float] | None:
    """(t_min, t_max) in [0, 1] from --min_timestep/--max_timestep, None when the full range is trained."""
    lo, hi = getattr(flow, "min_timestep", None), getattr(flow, "max_timestep", None)
    if lo is None and hi is None:
        return None
    return (lo or 0) / NUM_TRAIN_TIMESTEPS, (NUM_TRAIN_TIMESTEPS if hi is None else hi) / NUM_TRAIN_TIMESTEPS


def sample_noised(latents: torch.Tensor, noise: torch.Tensor, flow, generator: torch.Generator) -> NoisedBatch:
    """Draw timesteps per --timestep_sampling and mix latents with noise: x_t = (1 - s) x0 + s n.

    --min_timestep/--max_timestep map the drawn t in [0, 1] linearly onto [min, max] / 1000 (the rule upstream's
    SD3 path uses). --ip_noise_gamma perturbs only the model input: x_t = (1 - s) x0 + s (n + gamma xi), the
    target keeps n (upstream's FLUX formula); with random strength gamma ~ U(0, gamma) once per step."""
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
            t = _time_shift(flux_mu(seq_len), t)
        sig = t
    bounds = timestep_range(flow)
    if bounds is not None:
        sig = sig * (bounds[1] - bounds[0]) + bounds[0]
    sigmas = sig.to(latents.device, torch.float32).view(-1, 1, 1, 1)
    mixed_noise = noise.float()
    gamma = getattr(flow, "ip_noise_gamma", 0.0)
    if gamma:
        xi = torch.randn(latents.shape, generator=generator).to(latents.device, torch.float32)
        if flow.ip_noise_gamma_random_strength:
            gamma = (torch.rand(1, generator=generator) * gamma).to(latents.device)
        mixed_noise = mixed_noise + gamma * xi
    noisy = (1.0 - sigmas) * latents.float() + sigmas * mixed_noise
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


def huber_threshold(flow, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber threshold c for --huber_schedule (timesteps in [0, 1000]), as upstream:
    constant: huber_c * huber_scale; exponential: huber_scale * exp(ln(huber_c) * t / 1000), i.e. huber_scale
    at t=0 falling to huber_c * huber_scale at t=1000."""
    c = getattr(flow, "huber_c", HUBER_C)
    scale = getattr(flow, "huber_scale", 1.0)
    t = timesteps.float()
    if getattr(flow, "huber_schedule", "constant") == "exponential":
        alpha = -math.log(c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * t) * scale
    return torch.full_like(t, c * scale)


def masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Upstream's masked loss: the (B, H, W) mask area-resized to the loss's (h, w), multiplied in."""
    mask = mask.to(loss.device, loss.dtype).unsqueeze(1)
    return loss * torch.nn.functional.interpolate(mask, size=loss.shape[2:], mode="area")


def flow_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
              weighting: torch.Tensor | None = None, *, huber_c: torch.Tensor | float | None = None,
              mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of a batch: element loss, times weighting, times mask, mean per sample, times sample weights
    (--prior_loss_weight), mean over the batch (upstream's order)."""
    pred, target = pred.float(), target.float()
    c = HUBER_C if huber_c is None else huber_c
    if isinstance(c, torch.Tensor):
        c = c.to(pred.device, torch.float32).view(-1, 1, 1, 1)
    if loss_type == "l2":
        loss = (pred - target) ** 2
    elif loss_type == "l1":
        loss = (pred - target).abs()
    elif loss_type == "huber":
        loss = 2 * c * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    elif loss_type == "smooth_l1":
        loss = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    else:
        raise ValueError(f"--loss_type {loss_type}: expected l1, l2, huber or smooth_l1")
    if weighting is not None:
        loss = loss * weighting
    if mask is not None:
        loss = masked(loss, mask)
    loss = loss.mean(dim=(1, 2, 3))
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.device, loss.dtype)
    return loss.mean()
