"""Flow-matching sampling, losses and optimizer/scheduler construction (pure functions)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from library import flow_matching as fm
from library import optim
from library.settings import OptimizerSettings, SettingsError


def flow(**kw):
    base = dict(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                model_prediction_type="raw", weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0,
                mode_scale=1.29, guidance_scale=1.0, loss_type="l2")
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("kind", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_noised_batch_interpolates_and_is_seeded(kind):
    latents = torch.randn(4, 16, 8, 8)
    noise = torch.randn(4, 16, 8, 8)
    a = fm.sample_noised(latents, noise, flow(timestep_sampling=kind), torch.Generator().manual_seed(3))
    b = fm.sample_noised(latents, noise, flow(timestep_sampling=kind), torch.Generator().manual_seed(3))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timesteps, b.timesteps)
    s = a.sigmas
    assert torch.all((s > 0) & (s <= 1))
    torch.testing.assert_close(a.noisy, (1 - s) * latents + s * noise)
    torch.testing.assert_close(a.timesteps, s.view(-1) * 1000)


def test_shift_pushes_timesteps_up():
    latents, noise = torch.zeros(4096, 1, 2, 2), torch.zeros(4096, 1, 2, 2)
    plain = fm.sample_noised(latents, noise, flow(timestep_sampling="sigmoid"), torch.Generator().manual_seed(0))
    shifted = fm.sample_noised(latents, noise, flow(timestep_sampling="shift", discrete_flow_shift=3.1582),
                               torch.Generator().manual_seed(0))
    assert shifted.sigmas.mean() > plain.sigmas.mean() + 0.1


def test_sigma_table_matches_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(fm.shifted_sigmas(3.0), sched.sigmas.float(), atol=1e-5, rtol=1e-5)


def test_losses_and_prediction_types():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert fm.flow_loss(pred, target, "l2").item() == pytest.approx(1.0)
    assert fm.flow_loss(pred * 3, target, "l1").item() == pytest.approx(3.0)
    huber = fm.flow_loss(pred, target, "huber").item()
    assert huber == pytest.approx(2 * 0.1 * (math.sqrt(1 + 0.01) - 0.1))
    noised = fm.NoisedBatch(noisy=torch.full((2, 1, 2, 2), 5.0), timesteps=torch.tensor([500.0, 500.0]),
                            sigmas=torch.full((2, 1, 1, 1), 0.5))
    out, w = fm.apply_prediction_type(pred, noised, flow(model_prediction_type="additive"))
    assert torch.equal(out, pred + 5) and w is None
    out, w = fm.apply_prediction_type(pred, noised, flow(model_prediction_type="sigma_scaled",
                                                         weighting_scheme="sigma_sqrt"))
    assert torch.equal(out, pred * -0.5 + 5) and torch.allclose(w, torch.full_like(w, 4.0))
    with pytest.raises(ValueError, match="--loss_type"):
        fm.flow_loss(pred, target, "l3")


def opt_settings(**kw):
    base = dict(type="AdamW", learning_rate=1e-3, unet_lr=None, text_encoder_lr=None, args={},
                scheduler="constant", warmup_steps=0, decay_steps=0, num_cycles=1, power=1.0, max_grad_norm=1.0)
    base.update(kw)
    return OptimizerSettings(**base)


def test_optimizers_and_schedulers():
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = optim.create_optimizer(opt_settings(), [{"params": params}])
    assert isinstance(adam, torch.optim.AdamW)
    ada = optim.create_optimizer(opt_settings(type="adafactor", args={"relative_step": False,
                                                                      "scale_parameter": False,
                                                                      "warmup_init": False}), [{"params": params}])
    assert type(ada).__name__ == "Adafactor" and ada.param_groups[0]["lr"] == 1e-3
    sched = optim.create_scheduler(opt_settings(scheduler="linear", warmup_steps=0.5), adam, 10)
    lrs = []
    for _ in range(10):
        lrs.append(adam.param_groups[0]["lr"])
        adam.step()
        sched.step()
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-3) and lrs[5] == pytest.approx(1e-3)
    with pytest.raises(SettingsError, match="--optimizer_type"):
        optim.create_optimizer(opt_settings(type="Sophia"), [{"params": params}])
    with pytest.raises(SettingsError, match="--lr_scheduler"):
        optim.create_scheduler(opt_settings(scheduler="wobbly"), adam, 10)
