"""Under bf16 the timestep and guidance reach FLUX's embeddings as float32 `x * 1000`, as upstream.

The value is observed where it enters the sinusoidal projection (`time_text_embed.time_proj`),
which diffusers calls first with the timestep and then with the guidance.
"""
from __future__ import annotations

import pytest
import torch

from library import flux_loading
from train_helpers import make_dataset, run_trainer_in_process, trainer_args


def _record_time_proj(model) -> list[torch.Tensor]:
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
    seen = _record_time_proj(ours)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _inputs(ours).items()}
    ours(timestep=t, guidance=guidance, **inputs)
    assert [v.dtype for v in seen] == [torch.float32, torch.float32]
    assert seen[0].item() == (t * 1000).item()  # float32 product, not the bf16-rounded 732.0
    assert seen[1].item() == 3500.0

    # The stock diffusers model rounds both in bf16: this is what the hooks fix.
    stock = FluxTransformer2DModel.from_config(ours.config).to(torch.bfloat16).eval()
    stock_seen = _record_time_proj(stock)
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


def test_training_and_sampling_under_bf16_reach_the_embedding_in_float32(tiny_models, tmp_path, monkeypatch):
    """The real trainer (in process) with --mixed_precision bf16: every guidance value is 3500.0 and every
    timestep is a float32 value that bf16 cannot hold, in the sample images and in the training step."""
    loaded: list = []
    original = flux_loading.load_flow_model

    passed_dtypes: list = []

    def recording_loader(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(_record_time_proj(model))
        model.register_forward_pre_hook(lambda m, a, kw: passed_dtypes.append(kw["timestep"].dtype), with_kwargs=True)
        return model

    monkeypatch.setattr(flux_loading, "load_flow_model", recording_loader)
    _, toml = make_dataset(tmp_path / "data", count=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok a picture --w 64 --h 64 --s 2 --d 1 --g 3.5\n", encoding="utf-8")
    args = trainer_args(tiny_models, toml, tmp_path / "out", "--max_train_steps", "1",
                        "--sample_prompts", str(prompts), "--sample_at_first")
    args[args.index("--mixed_precision") + 1] = "bf16"
    args[args.index("--guidance_scale") + 1] = "3.5"
    assert run_trainer_in_process(args) == 0
    (seen,) = loaded
    timesteps, guidance = seen[0::2], seen[1::2]
    assert len(timesteps) == 2 + 1  # two sampling steps, then one training step
    assert all(g.dtype == torch.float32 and g.tolist() == [3500.0] for g in guidance)
    # The callers pass t itself in float32, so nothing is rounded before the x1000 either.
    assert passed_dtypes == [torch.float32] * 3 and all(t.dtype == torch.float32 for t in timesteps)
    # The training step's random timestep: a bf16 round trip would change it.
    assert not torch.equal(timesteps[-1], timesteps[-1].bfloat16().float())
    assert (tmp_path / "out" / "tiny.safetensors").is_file()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
