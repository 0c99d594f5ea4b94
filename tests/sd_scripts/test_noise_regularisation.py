"""Noise offset (and adaptive noise scale), multires noise, ip noise gamma, timestep range, Huber schedules, masked/prior-weighted loss and LoRA dropouts,
each checked against upstream's formula written out here on fixed tensors."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from library.flow_matching import flow_loss, huber_threshold, sample_noised, training_noise
from library.regularisation import step_rng
from library.settings import FlowSettings

FLOW = FlowSettings(timestep_sampling="uniform", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                    model_prediction_type="raw", weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0,
                    mode_scale=1.29, guidance_scale=1.0, loss_type="l2")
SHAPE = (2, 3, 4, 4)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    g = gen()
    base = torch.randn(SHAPE, generator=g)
    z = torch.randn((2, 3, 1, 1), generator=g)
    noise = training_noise(SHAPE, replace(FLOW, noise_offset=0.1), gen())
    assert torch.allclose(noise, base + 0.1 * z)
    assert torch.equal(training_noise(SHAPE, FLOW, gen()), torch.randn(SHAPE, generator=gen()))  # off: unchanged


def test_noise_offset_random_strength_draws_strength_in_zero_to_offset():
    g = gen()
    base = torch.randn(SHAPE, generator=g)
    strength = torch.rand(1, generator=g) * 0.3
    z = torch.randn((2, 3, 1, 1), generator=g)
    noise = training_noise(SHAPE, replace(FLOW, noise_offset=0.3, noise_offset_random_strength=True), gen())
    assert 0 <= float(strength) <= 0.3 and torch.allclose(noise, base + strength * z)


def test_adaptive_noise_scale_adds_scaled_abs_channel_mean_to_the_offset():
    """strength = clamp(noise_offset + scale * |mean over H, W of latents[b, c]|, min 0), per sample and channel."""
    means = torch.tensor([[-0.5, 0.2, 0.0], [1.0, -2.0, 0.4]])
    latents = means.view(2, 3, 1, 1).expand(SHAPE).clone()
    g = gen()
    base = torch.randn(SHAPE, generator=g)
    z = torch.randn((2, 3, 1, 1), generator=g)
    noise = training_noise(SHAPE, replace(FLOW, noise_offset=0.1, adaptive_noise_scale=0.5), gen(), latents)
    strength = torch.tensor([[0.35, 0.2, 0.1], [0.6, 1.1, 0.3]]).view(2, 3, 1, 1)  # 0.1 + 0.5 * |mean|
    assert torch.allclose(noise, base + strength * z)
    negative = training_noise(SHAPE, replace(FLOW, noise_offset=0.1, adaptive_noise_scale=-0.25), gen(), latents)
    clamped = torch.tensor([[0.0, 0.05, 0.1], [0.0, 0.0, 0.0]]).view(2, 3, 1, 1)  # 0.1 - 0.25 * |mean|, >= 0
    assert torch.allclose(negative, base + clamped * z)


def test_multires_noise_pyramid_on_a_4x4_latent():
    """On 4x4, level 0 is full-size noise (r**0 = 1) and level 1 is 1x1 (int(4 / r) = 1 for r in (2, 4)), which
    upsamples to a constant and ends the pyramid: noise = (n + l0 + discount * c) / std, whatever the iterations."""
    shape = (1, 2, 4, 4)
    g = gen()
    base = torch.randn(shape, generator=g)
    r0 = float(torch.rand(1, generator=g)) * 2 + 2
    level0 = torch.randn(shape, generator=g)
    r1 = float(torch.rand(1, generator=g)) * 2 + 2
    level1 = torch.randn((1, 2, 1, 1), generator=g)
    assert 2 < r1 < 4 and r0 >= 2
    total = base + level0 + 0.3 * level1  # a 1x1 level upsampled bilinearly is its value everywhere
    expected = total / total.std()
    flow = replace(FLOW, multires_noise_iterations=2, multires_noise_discount=0.3)
    noise = training_noise(shape, flow, gen())
    assert torch.allclose(noise, expected, atol=1e-6) and float(noise.std()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(training_noise(shape, replace(flow, multires_noise_iterations=8), gen()), noise)  # stopped at 1x1
    assert not torch.allclose(training_noise(shape, flow, gen(8)), noise)  # per-step generator: new step, new noise


def test_multires_noise_level_sizes_on_a_16x16_latent():
    """Level i is N(0,1) at max(1, int(16 / r**i)) per side, bilinearly upsampled, weighted discount**i."""
    import torch.nn.functional as F

    shape = (1, 1, 16, 16)
    g = gen(3)
    total = torch.randn(shape, generator=g).clone()
    sizes = []
    for i in range(3):
        r = float(torch.rand(1, generator=g)) * 2 + 2
        side = max(1, int(16 / r ** i))
        sizes.append(side)
        total += F.interpolate(torch.randn((1, 1, side, side), generator=g), size=(16, 16), mode="bilinear") * 0.5 ** i
        if side == 1:
            break
    noise = training_noise(shape, replace(FLOW, multires_noise_iterations=3, multires_noise_discount=0.5), gen(3))
    assert sizes[0] == 16 and 4 <= sizes[1] <= 8
    assert torch.allclose(noise, total / total.std(), atol=1e-6)


def test_timestep_range_maps_t_linearly():
    latents, noise = torch.zeros(SHAPE), torch.ones(SHAPE)
    t = torch.rand(2, generator=gen())  # uniform sampling draws t first
    out = sample_noised(latents, noise, replace(FLOW, min_timestep=200, max_timestep=500), gen())
    expected = t * (0.5 - 0.2) + 0.2
    assert torch.allclose(out.sigmas.view(-1), expected)
    assert torch.allclose(out.timesteps, expected * 1000)
    assert torch.allclose(out.noisy, expected.view(-1, 1, 1, 1).expand(SHAPE))  # (1-s)*0 + s*1
    many = sample_noised(torch.zeros(256, 1, 2, 2), torch.zeros(256, 1, 2, 2),
                         replace(FLOW, timestep_sampling="sigmoid", min_timestep=100), gen())
    assert float(many.timesteps.min()) >= 100 and float(many.timesteps.max()) <= 1000


def test_ip_noise_gamma_perturbs_the_input_only():
    latents = torch.full(SHAPE, 2.0)
    noise = torch.randn(SHAPE, generator=gen(1))
    g = gen()
    t = torch.rand(2, generator=g).view(-1, 1, 1, 1)
    xi = torch.randn(SHAPE, generator=g)
    out = sample_noised(latents, noise, replace(FLOW, ip_noise_gamma=0.1), gen())
    assert torch.allclose(out.noisy, (1 - t) * latents + t * (noise + 0.1 * xi), atol=1e-6)
    g = gen()
    t = torch.rand(2, generator=g).view(-1, 1, 1, 1)
    xi = torch.randn(SHAPE, generator=g)
    gamma = torch.rand(1, generator=g) * 0.1
    out = sample_noised(latents, noise, replace(FLOW, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), gen())
    assert torch.allclose(out.noisy, (1 - t) * latents + t * (noise + gamma * xi), atol=1e-6)


def test_huber_threshold_schedules():
    t = torch.tensor([0.0, 500.0, 1000.0])
    exp = huber_threshold(replace(FLOW, huber_schedule="exponential", huber_c=0.1, huber_scale=2.0), t)
    assert torch.allclose(exp, torch.tensor([2.0, 2.0 * math.sqrt(0.1), 0.2]))
    const = huber_threshold(replace(FLOW, huber_schedule="constant", huber_c=0.1, huber_scale=2.0), t)
    assert torch.allclose(const, torch.full((3,), 0.2))


def test_huber_and_smooth_l1_with_per_sample_threshold():
    pred = torch.zeros(2, 1, 1, 1)
    target = torch.full((2, 1, 1, 1), 0.3)
    c = torch.tensor([0.1, 0.2])
    huber = flow_loss(pred, target, "huber", huber_c=c)
    expected = (2 * 0.1 * (math.sqrt(0.09 + 0.01) - 0.1) + 2 * 0.2 * (math.sqrt(0.09 + 0.04) - 0.2)) / 2
    assert float(huber) == pytest.approx(expected, rel=1e-6)
    smooth = flow_loss(pred, target, "smooth_l1", huber_c=c)
    expected = (2 * (math.sqrt(0.1) - 0.1) + 2 * (math.sqrt(0.13) - 0.2)) / 2
    assert float(smooth) == pytest.approx(expected, rel=1e-6)


def test_masked_loss_and_prior_loss_weight():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask = torch.zeros(2, 4, 4)
    mask[:, :, :2] = 1.0  # left half of a 4x4 alpha mask; area-resized to 2x2: left column 1, right 0
    loss = flow_loss(pred, target, "l2", mask=mask, sample_weights=torch.tensor([1.0, 0.5]))
    per_sample = (1.0 + 9.0) / 4  # squared errors 1 and 9 kept of 1, 4, 9, 16
    assert float(loss) == pytest.approx((per_sample * 1.0 + per_sample * 0.5) / 2)


def _lora(**kw):
    from networks.lora_flux import LoRAModule

    torch.manual_seed(0)
    mod = LoRAModule("m", 6, 9, 4, 4.0, **kw)
    nn.init.normal_(mod.lora_up.weight)
    return mod


def test_rank_dropout_masks_ranks_and_rescales_shared_by_fused_slices():
    mod = _lora(rank_dropout=0.5, num_targets=3).train()
    x = torch.randn(2, 5, 6)
    torch.manual_seed(11)
    slices = [mod.delta(x, a, a + 3) for a in (0, 3, 6)]  # q, k, v of one fused module
    torch.manual_seed(11)
    keep = (torch.rand((2, 4)) > 0.5).unsqueeze(1).float()
    h = (x @ mod.lora_down.weight.T) * keep
    expected = (h @ mod.lora_up.weight.T) * (mod.scale / 0.5)
    assert torch.allclose(torch.cat(slices, dim=-1), expected, atol=1e-6)
    mod.eval()
    plain = (x @ mod.lora_down.weight.T) @ mod.lora_up.weight.T * mod.scale
    assert torch.allclose(torch.cat([mod.delta(x, a, a + 3) for a in (0, 3, 6)], -1), plain, atol=1e-6)


def test_module_dropout_skips_the_whole_module():
    mod = _lora(module_dropout=0.5).train()
    x = torch.randn(3, 6)
    outcomes = []
    for seed in range(20):
        torch.manual_seed(seed)
        dropped = bool(torch.rand(1) < 0.5)
        torch.manual_seed(seed)
        outcomes.append((mod.delta(x, 0, 9) is None) == dropped)
    assert all(outcomes)


def test_network_dropout_zeroes_features_at_the_down_projection():
    mod = _lora(dropout=0.5).train()
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    out = mod.delta(x, 0, 9)
    torch.manual_seed(3)
    h = nn.functional.dropout(x @ mod.lora_down.weight.T, p=0.5)
    assert torch.allclose(out, h @ mod.lora_up.weight.T * mod.scale, atol=1e-6)


def test_step_rng_is_reproducible_and_restores_the_global_stream():
    before = torch.get_rng_state()
    with step_rng(123, torch.device("cpu")):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with step_rng(123, torch.device("cpu")):
        b = torch.rand(3)
    assert torch.equal(a, b)


def test_scale_weight_norms_caps_the_module_norm():
    from library.regularisation import scale_weight_norms
    from networks.lora_flux import LoRANetwork, _Target

    lin = nn.Linear(6, 9)
    net = LoRANetwork({"lora_unet_x": (_Target(lin, 0, 9),)}, {}, dims={"lora_unet_x": 4},
                      alphas={"lora_unet_x": 4.0})
    mod = net.get_submodule("lora_unet_x")
    nn.init.normal_(mod.lora_up.weight)
    norm_before = float((mod.lora_up.weight @ mod.lora_down.weight).detach().norm())
    assert norm_before > 0.5

    logged = {}
    postfix = scale_weight_norms(net, 0.5, log=logged.update)
    assert postfix["Keys Scaled"] == 1 and postfix["Average key norm"] == pytest.approx(0.5, rel=1e-5)
    assert float((mod.lora_up.weight @ mod.lora_down.weight).detach().norm()) == pytest.approx(0.5, rel=1e-5)
    assert logged["max_norm/keys_scaled"] == 1


@pytest.mark.parametrize("flags, needle", [
    (["--loss_type", "huber", "--huber_schedule", "snr"], "--huber_schedule snr"),
    (["--min_timestep", "600", "--max_timestep", "500"], "--min_timestep 600"),
    (["--network_dropout", "1.0"], "--network_dropout"),
    (["--network_args", "rank_dropout=2"], "rank_dropout"),
    (["--scale_weight_norms", "0"], "--scale_weight_norms"),
    (["--noise_offset", "-0.1"], "--noise_offset"),
    (["--huber_c", "0"], "--huber_c"),
    (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale 0.1 needs --noise_offset"),
    (["--multires_noise_iterations", "-1"], "--multires_noise_iterations"),
    (["--multires_noise_iterations", "6", "--multires_noise_discount", "0"], "--multires_noise_discount"),
])
def test_bad_values_name_the_flag(flags, needle):
    import flux_train_network
    from library.settings import SettingsError, settings_from_args

    base = ["--pretrained_model_name_or_path", "m", "--clip_l", "c", "--t5xxl", "t", "--ae", "a",
            "--dataset_config", "d.toml", "--output_dir", "o"]
    with pytest.raises(SettingsError, match=needle.replace("-", r"\-")):
        settings_from_args(flux_train_network.setup_parser().parse_args(base + flags))
