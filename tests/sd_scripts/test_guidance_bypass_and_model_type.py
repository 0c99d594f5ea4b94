"""--bypass_flux_guidance, --model_type, and both new model/caption flags through the real trainer.

The bypassed forward is compared with diffusers' own FLUX transformer built without a guidance embedder
(same weights, guidance_in left out): an independent computation of "the guidance term removed".
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import flux_train_network
from library import flux_loading, flux_time_inputs, prompt_weights
from library.settings import SettingsError, settings_from_args


def _inputs(model, batch: int = 2) -> dict:
    cfg, g = model.config, torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(batch, 4, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 3, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.25, 0.8]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
                return_dict=False)


def _without_guidance_embedder(model):
    from diffusers import FluxTransformer2DModel

    stock = FluxTransformer2DModel.from_config({**model.config, "guidance_embeds": False}).eval()
    kept = {k: v for k, v in model.state_dict().items() if "guidance_embedder" not in k}
    stock.load_state_dict(kept, strict=True)  # every other weight has a place: only the guidance term is gone
    return stock


def test_bypassed_forward_equals_a_model_without_guidance_embedder(tiny_models):
    from diffusers import FluxTransformer2DModel

    ours = flux_loading.load_flow_model(tiny_models["unet"], dtype=torch.float32)
    stock_guided = FluxTransformer2DModel.from_config(ours.config).eval()
    stock_guided.load_state_dict(ours.state_dict())
    no_guidance = _without_guidance_embedder(ours)
    guidance = torch.tensor([3.5, 3.5])
    with torch.no_grad():
        before = ours(guidance=guidance, **_inputs(ours))[0]
        assert flux_time_inputs.allow_guidance_bypass(ours) is True
        assert flux_time_inputs.allow_guidance_bypass(ours) is True  # installing twice is a no-op
        bypassed = ours(guidance=None, **_inputs(ours))[0]  # what a training step passes with the flag
        assert torch.equal(bypassed, no_guidance(guidance=None, **_inputs(ours))[0])
        # sampling still passes guidance: unchanged, and the guidance term really mattered
        guided = ours(guidance=guidance, **_inputs(ours))[0]
        assert torch.equal(guided, before) and torch.equal(guided, stock_guided(guidance=guidance, **_inputs(ours))[0])
        assert not torch.allclose(guided, bypassed)


def test_schnell_like_model_has_nothing_to_bypass(tiny_models):
    schnell = _without_guidance_embedder(flux_loading.load_flow_model(tiny_models["unet"], dtype=torch.float32))
    with torch.no_grad():
        before = schnell(guidance=None, **_inputs(schnell))[0]
        assert flux_time_inputs.allow_guidance_bypass(schnell) is False
        assert torch.equal(schnell(guidance=None, **_inputs(schnell))[0], before)


BASE = ["--pretrained_model_name_or_path", "m.sft", "--clip_l", "c", "--t5xxl", "t", "--ae", "a",
        "--dataset_config", "d.toml", "--output_dir"]


def test_model_type_flux_accepted_chroma_refused_before_loading(tmp_path, capsys):
    from library import args

    parser = flux_train_network.setup_parser()
    for flag in ("--model_type", "--bypass_flux_guidance", "--weighted_captions"):
        action = parser._option_string_actions[flag]
        assert not isinstance(action, args.UnsupportedFlag) and flag not in args.UNSUPPORTED_FLAGS
    assert "chroma is refused" in parser._option_string_actions["--model_type"].help
    s = settings_from_args(parser.parse_args(BASE + [str(tmp_path), "--model_type", "flux", "--bypass_flux_guidance",
                                                     "--weighted_captions"]))
    assert s.flow.bypass_guidance and s.model.weighted_captions
    with pytest.raises(SettingsError, match="--model_type chroma: Chroma checkpoints are not supported"):
        settings_from_args(parser.parse_args(BASE + [str(tmp_path), "--model_type", "chroma"]))
    # through the entry point: exit 2, the Chroma message first (the model files here do not even exist)
    assert flux_train_network.main(BASE + [str(tmp_path / "out"), "--model_type", "chroma"]) == 2
    err = capsys.readouterr().err
    assert "error: --model_type chroma" in err and "upstream sd-scripts" in err and "m.sft" not in err
    assert not (tmp_path / "out").exists()


def test_advanced_panel_shows_the_flags():
    from fluxgym.webui import advanced

    flags = {f.flag: f for f in advanced.advanced_flags()}
    assert flags["--weighted_captions"].switch and flags["--bypass_flux_guidance"].switch
    assert flags["--model_type"].choices == ("flux", "chroma") and flags["--model_type"].default == "flux"


def _schnell_file(unet, path):
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(unet).items() if not k.startswith("guidance_in.")}, path)
    return path


def test_trainer_weighted_cache_and_bypassed_training_forward(tiny_models, tmp_path, monkeypatch, capfd):
    """Run 1 (schnell-like model, no weights): the bypass flag warns and changes nothing; the TE cache holds
    the literal captions. Run 2 (dev-like, weighted, bypass): that cache is stale and re-made with weighted
    T5 states; training forwards never call the guidance embedder, sample forwards do."""
    from safetensors import safe_open
    from train_helpers import make_dataset, run_trainer_in_process, trainer_args

    from library.text_encoding import FluxTextEncoder

    image_dir, toml = make_dataset(tmp_path / "data", count=2)
    captions = ["tok, (picture:1.5) number 0", "[tok], ((photo)) number 1"]
    for i, caption in enumerate(captions):
        (image_dir / f"img{i:02d}.txt").write_text(caption, encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a (red:1.5) square --w 64 --h 64 --s 2 --d 1 --l 1\n", encoding="utf-8")
    common = ["--max_train_steps", "1", "--t5xxl_max_token_length", "32", "--bypass_flux_guidance"]
    schnell = dict(tiny_models, unet=_schnell_file(tiny_models["unet"], tmp_path / "schnell.safetensors"))
    assert run_trainer_in_process(trainer_args(schnell, toml, tmp_path / "out1", *common)) == 0
    assert "has no guidance embedder" in capfd.readouterr().err
    first_cache = np.load(image_dir / "img00_flux_te.npz")["t5_out"]

    calls = {"forward": 0, "guidance": 0}
    parsed: list[str] = []
    original_bypass, original_parse = flux_time_inputs.allow_guidance_bypass, prompt_weights.parse_weighted

    def counting_bypass(model):
        model.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
        embedder = model.time_text_embed.guidance_embedder
        embedder.register_forward_pre_hook(lambda *a: calls.__setitem__("guidance", calls["guidance"] + 1))
        return original_bypass(model)

    monkeypatch.setattr(flux_time_inputs, "allow_guidance_bypass", counting_bypass)
    monkeypatch.setattr(prompt_weights, "parse_weighted", lambda text: parsed.append(text) or original_parse(text))
    out = tmp_path / "out2"
    args = trainer_args(tiny_models, toml, out, *common, "--weighted_captions", "--sample_prompts", str(prompts),
                        "--sample_at_first")
    assert run_trainer_in_process(args) == 0
    assert "text encoder cache" in capfd.readouterr().err  # run 1's unweighted cache was found stale
    # sampling at step 0: 2 denoising forwards with guidance; the training step: 1 forward without
    assert calls == {"forward": 3, "guidance": 2}
    assert "a (red:1.5) square" in parsed  # the sample prompt is parsed too
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_bypass_flux_guidance"] == "True"

    cache = tiny_models["tokenizer_cache_dir"]
    parts = (flux_loading.load_clip_l(tiny_models["clip_l"], dtype=torch.float32),
             flux_loading.load_t5xxl(tiny_models["t5xxl"], dtype=torch.float32))
    from library import flux_tokenizers as ft

    tokenizers = (ft.load_clip_tokenizer(cache), ft.load_t5_tokenizer(cache))
    weighted = FluxTextEncoder(*tokenizers, *parts, t5_max_length=32, apply_t5_attn_mask=False,
                               weighted_captions=True).encode(captions[:1])
    literal = FluxTextEncoder(*tokenizers, *parts, t5_max_length=32, apply_t5_attn_mask=False).encode(captions[:1])
    cached = np.load(image_dir / "img00_flux_te.npz")
    assert np.allclose(cached["t5_out"], weighted["t5_out"][0].numpy(), atol=1e-5)
    assert not np.allclose(cached["t5_out"], literal["t5_out"][0].numpy(), atol=1e-3)
    assert np.allclose(first_cache, literal["t5_out"][0].numpy(), atol=1e-5)  # run 1 cached the literal caption
    assert np.allclose(cached["l_pooled"], weighted["l_pooled"][0].numpy(), atol=1e-5)
