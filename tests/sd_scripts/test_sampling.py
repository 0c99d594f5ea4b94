"""Sample prompts (sd-scripts syntax), sample file names, and PNG generation with a tiny FLUX + AE."""
from __future__ import annotations

import contextlib
import json
import logging
import zlib
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from library import sampling
from library.sampling import SamplePrompt, SamplePromptError, parse_sample_prompts, sample_image_path
from networks import lora_flux


# ----- prompt files ------------------------------------------------------------------------------------
def test_txt_prompts_with_options_comments_and_blank_lines(tmp_path, caplog):
    f = tmp_path / "sample_prompts.txt"
    f.write_text("# a comment line\n\n"
                 "a photo of sks dog --w 768 --h 512 --d 42 --s 28 --g 4.0 --l 2.5 --n blurry, low quality\n"
                 "  plain prompt  \n"
                 "steps clamp --s 5000 --ss euler_a --zz 3\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        prompts = parse_sample_prompts(f)
    assert [p.prompt for p in prompts] == ["a photo of sks dog", "plain prompt", "steps clamp"]
    p = prompts[0]
    assert (p.width, p.height, p.seed, p.steps, p.guidance_scale, p.cfg_scale, p.negative_prompt) == (
        768, 512, 42, 28, 4.0, 2.5, "blurry, low quality")
    assert p.texts_to_encode() == ["a photo of sks dog", "blurry, low quality"]
    q = prompts[1]
    assert (q.width, q.height, q.seed, q.steps, q.guidance_scale, q.cfg_scale) == (512, 512, None, 20, 3.5, 1.0)
    assert q.texts_to_encode() == ["plain prompt"]
    assert prompts[2].steps == 1000
    assert "--ss" in caplog.text and "--zz" in caplog.text


def test_size_rounds_down_to_16_with_minimum_64():
    assert SamplePrompt("x", width=1000, height=70).size == (992, 64)
    assert SamplePrompt("x", width=20, height=512).size == (64, 512)


def test_bad_option_value_names_file_and_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("ok\nbroken --w wide\n", encoding="utf-8")
    with pytest.raises(SamplePromptError, match=r"p\.txt:2.*--w.*'wide'"):
        parse_sample_prompts(f)
    with pytest.raises(SamplePromptError, match="--sample_prompts: file not found"):
        parse_sample_prompts(tmp_path / "missing.txt")


def test_toml_and_json_prompt_files(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 256\nsample_steps = 8\nguidance_scale = 2.0\n\n'
                 '[[prompt.subset]]\nprompt = "first"\nseed = 1\n\n'
                 '[[prompt.subset]]\nprompt = "second"\nwidth = 320\nnegative_prompt = "bad"\nscale = 3.0\n',
                 encoding="utf-8")
    a, b = parse_sample_prompts(t)
    assert (a.prompt, a.width, a.steps, a.seed, a.guidance_scale) == ("first", 256, 8, 1, 2.0)
    assert (b.prompt, b.width, b.negative_prompt, b.cfg_scale) == ("second", 320, "bad", 3.0)
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "j1", "height": 128, "sample_steps": 3}]), encoding="utf-8")
    (c,) = parse_sample_prompts(j)
    assert (c.prompt, c.height, c.steps) == ("j1", 128, 3)
    j.write_text(json.dumps([{"width": 5}]), encoding="utf-8")
    with pytest.raises(SamplePromptError, match="entry 1.*'prompt'"):
        parse_sample_prompts(j)
    t.write_text("[prompt\n", encoding="utf-8")
    with pytest.raises(SamplePromptError, match="not valid TOML"):
        parse_sample_prompts(t)


def test_sample_image_path_format(tmp_path):
    p = sample_image_path(tmp_path, "my_lora", 250, 3, datetime(2026, 1, 2, 3, 4, 5))
    assert p == tmp_path / "sample" / "my_lora_000250_03_20260102030405.png"
    # upstream's variants: epoch-end samples are numbered by epoch, a fixed seed is appended
    p = sample_image_path(tmp_path, "my_lora", 250, 3, datetime(2026, 1, 2, 3, 4, 5), epoch=4, seed=42)
    assert p == tmp_path / "sample" / "my_lora_e000004_03_20260102030405_42.png"


# ----- generation --------------------------------------------------------------------------------------
def make_flux(guidance=True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))


def make_ae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                         latent_channels=16, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                         use_quant_conv=False, use_post_quant_conv=False)


def fake_encode(text: str) -> dict:
    """Deterministic stand-in for FluxTextEncoder.encode([text]) (shapes as the trainer caches them)."""
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return {"l_pooled": torch.randn(1, 32, generator=g), "t5_out": torch.randn(1, 8, 32, generator=g),
            "txt_ids": torch.zeros(1, 8, 3), "t5_attn_mask": torch.tensor([[1] * 5 + [0] * 3])}


@pytest.fixture(scope="module")
def models():
    return make_flux().eval(), make_ae().eval()


def generate(models, prompts, out, **kw):
    transformer, ae = models
    args = dict(transformer=transformer, ae=ae, encode_prompt=fake_encode, prompts=prompts, output_dir=out,
                output_name="demo", step=12, device="cpu", dtype=torch.float32, is_schnell=False)
    args.update(kw)
    return sampling.generate_samples(**args)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generates_named_pngs_of_the_right_size_deterministically(models, tmp_path, monkeypatch):
    events = []

    @contextlib.contextmanager
    def guard(idx):
        events.append(("enter", idx))
        yield
        events.append(("exit", idx))

    monkeypatch.setattr(sampling, "inject_point", lambda site: events.append(("inject", site)))
    transformer, ae = models
    transformer.train()
    prompts = [SamplePrompt("a cat", width=64, height=64, seed=7, steps=3),
               SamplePrompt("a dog", width=100, height=80, seed=8, steps=2)]
    paths = generate(models, prompts, tmp_path / "a", per_image_guard=guard)
    assert [p.parent for p in paths] == [tmp_path / "a" / "sample"] * 2
    for idx, p in enumerate(paths):
        assert p.name.startswith(f"demo_000012_{idx:02d}_") and p.suffix == ".png"
        assert len(p.stem.split("_")[-2]) == 14 and p.stem.endswith(f"_{7 + idx}")  # timestamp, then --d seed
    assert Image.open(paths[0]).size == (64, 64) and Image.open(paths[1]).size == (96, 80)
    assert events == [("enter", 0), ("inject", "sample"), ("exit", 0), ("enter", 1), ("inject", "sample"), ("exit", 1)]
    assert transformer.training and not ae.training  # modes restored
    assert sorted(x.name for x in (tmp_path / "a" / "sample").iterdir()) == sorted(p.name for p in paths)

    again = generate(models, prompts[:1], tmp_path / "b")
    assert np.array_equal(pixels(paths[0]), pixels(again[0]))
    other = generate(models, [SamplePrompt("a cat", width=64, height=64, seed=9, steps=3)], tmp_path / "c")
    assert not np.array_equal(pixels(paths[0]), pixels(other[0]))
    assert pixels(paths[0]).std() > 0
    transformer.eval()


def test_sampling_leaves_global_rng_alone(models, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(models, [SamplePrompt("rng", width=64, height=64, steps=1)], tmp_path)  # no seed: random image
    assert torch.equal(torch.rand(3), expected)


def test_lora_is_active_during_sampling(models, tmp_path):
    transformer, _ = models
    prompt = [SamplePrompt("lora", width=64, height=64, seed=3, steps=2)]
    base = pixels(generate(models, prompt, tmp_path / "base")[0])
    net = lora_flux.create_network(1.0, 4, 4, None, None, transformer)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    net.apply_to(None, transformer)
    net.train()
    try:
        with_lora = pixels(generate(models, prompt, tmp_path / "lora", network=net)[0])
        assert net.training
    finally:
        net.remove_hooks()
    assert not np.array_equal(base, with_lora)
    assert np.array_equal(base, pixels(generate(models, prompt, tmp_path / "base2")[0]))


def test_cfg_mask_schnell_and_bf16_paths(tmp_path):
    schnell = make_flux(guidance=False), make_ae()
    calls = []
    cfg = [SamplePrompt("x", width=64, height=64, seed=1, steps=2, cfg_scale=3.0, negative_prompt="bad")]

    def encode(text):
        calls.append(text)
        return fake_encode(text)

    out = generate(schnell, cfg, tmp_path / "s", is_schnell=True, encode_prompt=encode, apply_t5_attn_mask=True,
                   before_forward=lambda: calls.append("fwd"))
    assert calls == ["x", "bad"] + ["fwd"] * 4 and Image.open(out[0]).size == (64, 64)
    no_cfg = generate(schnell, [SamplePrompt("x", width=64, height=64, seed=1, steps=2)], tmp_path / "n",
                      is_schnell=True, apply_t5_attn_mask=True)
    assert not np.array_equal(pixels(out[0]), pixels(no_cfg[0]))
    unmasked = generate(schnell, [SamplePrompt("x", width=64, height=64, seed=1, steps=2)], tmp_path / "u",
                        is_schnell=True, apply_t5_attn_mask=False)
    assert not np.array_equal(pixels(unmasked[0]), pixels(no_cfg[0]))  # the T5 padding mask reaches attention
    # a negative prompt the trainer did not cache: warn and sample without CFG instead of failing the run
    cached = {"x": fake_encode("x")}
    fallback = generate(schnell, cfg, tmp_path / "f", is_schnell=True, encode_prompt=cached.__getitem__,
                        apply_t5_attn_mask=True)
    assert np.array_equal(pixels(fallback[0]), pixels(no_cfg[0]))
    bf16 = generate(schnell, [SamplePrompt("x", width=64, height=64, seed=1, steps=2)], tmp_path / "h",
                    is_schnell=True, dtype=torch.bfloat16)
    assert Image.open(bf16[0]).size == (64, 64)


def test_failed_image_leaves_no_temp_file_and_restores_modes(models, tmp_path):
    transformer, ae = models
    transformer.train()

    def broken(text):
        raise RuntimeError("encoder gone")

    with pytest.raises(RuntimeError, match="encoder gone"):
        generate(models, [SamplePrompt("x", width=64, height=64, seed=1, steps=1)], tmp_path, encode_prompt=broken)
    assert transformer.training
    assert not (tmp_path / "sample").exists() or not list((tmp_path / "sample").iterdir())
    transformer.eval()


def test_packing_used_by_sampling_matches_diffusers_flux_pipeline():
    from diffusers import FluxPipeline

    from library.flux_packing import image_ids, pack_latents, unpack_latents

    lat = torch.randn(1, 16, 8, 12)
    packed = pack_latents(lat)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 1, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), lat)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 96, 8), lat)
    assert torch.equal(image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))


def test_flux_shift_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from library.flow_matching import flux_mu

    for seq in (16, 256, 1024, 4096):
        assert flux_mu(seq) == pytest.approx(calculate_shift(seq))
