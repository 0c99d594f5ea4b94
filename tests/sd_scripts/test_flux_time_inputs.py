"""Under bf16 the timestep and guidance reach FLUX's embeddings as float32 `x * 1000`, as upstream.

The value is observed where it enters the sinusoidal projection (`time_text_embed.time_proj`),
which diffusers calls first with the timestep and then with the guidance. The same check through
the real trainer (training and sampling) is in test_trainer_bf16_run.py.
"""
from __future__ import annotations

import pytest
import torch

from library import flux_loading


def record_time_proj(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.time_text_embed.time_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def _inputs(model, batch: int = 1) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    tokens, txt = 4, 3
    return dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)


def test_loaded_model_embeds_float32_values_under_bf16(tiny_models):
    from diffusers import FluxTransformer2DModel

    t = torch.tensor([0.7313], dtype=torch.float32)
    guidance = torch.tensor([3.5], dtype=torch.float32)
    ours = flux_loading.load_flow_model(tiny_models["unet"], dtype=torch.bfloat16)
    seen = record_time_proj(ours)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _inputs(ours).items()}
    ours(timestep=t, guidance=guidance, **inputs)
    assert [v.dtype for v in seen] == [torch.float32, torch.float32]
    assert seen[0].item() == (t * 1000).item()  # float32 product, not the bf16-rounded 732.0
    assert seen[1].item() == 3500.0

    # The stock diffusers model rounds both in bf16: this is what the hooks fix.
    stock = FluxTransformer2DModel.from_config(ours.config).to(torch.bfloat16).eval()
    stock_seen = record_time_proj(stock)
    stock(timestep=t, guidance=guidance, **inputs)
    assert stock_seen[1].float().item() == 3504.0
    assert stock_seen[0].float().item() != seen[0].item()


def test_float32_model_is_unchanged(tiny_models):
    """In float32 the hooked model gives bit-identical output to the stock one with the same weights."""
    from diffusers import FluxTransformer2DModel

    ours = flux_loading.load_flow_model(tiny_models["unet"], dtype=torch.float32)
    stock = FluxTransformer2DModel.from_config(ours.config).eval()
    stock.load_state_dict(ours.state_dict())
    call = dict(timestep=torch.tensor([0.25, 0.9]), guidance=torch.tensor([3.5, 1.0]), **_inputs(ours, batch=2))
    with torch.no_grad():
        assert torch.equal(ours(**call)[0], stock(**call)[0])
    assert flux_loading.keep_time_inputs_float32(ours) is ours  # installing twice is a no-op


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
