"""Offline tokenizers, FluxTextEncoder outputs, and latent packing."""
from __future__ import annotations

import time

import pytest
import torch

from library import flux_loading as fl
from library import flux_tokenizers as ft
from library.flux_packing import image_ids, pack_latents, unpack_latents
from library.text_encoding import FluxTextEncoder

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/clip-vit-large-patch14, "a photo of a cat"


@pytest.fixture(scope="module")
def encoder(tiny_models):
    cache = tiny_models["tokenizer_cache_dir"]
    return FluxTextEncoder(ft.load_clip_tokenizer(cache), ft.load_t5_tokenizer(cache),
                           fl.load_clip_l(tiny_models["clip_l"], dtype=torch.float32),
                           fl.load_t5xxl(tiny_models["t5xxl"], dtype=torch.float32),
                           t5_max_length=24, apply_t5_attn_mask=False)


def test_clip_tokenizer_ids_match_openai(tiny_models):
    from_cache = ft.load_clip_tokenizer(tiny_models["tokenizer_cache_dir"])
    from_wheel = ft.build_clip_tokenizer_from_bpe()
    assert from_cache("a photo of a cat").input_ids == CAT_IDS
    caption = "A Portrait of ohwx woman, golden hour lighting; 35mm photo!"
    assert from_cache(caption).input_ids == from_wheel(caption).input_ids
    assert from_cache.model_max_length == 77 and len(from_cache) == 49408
    padded = from_cache(["x " * 200], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(padded) == 77 and padded[0] == 49406 and padded[-1] == 49407


def test_t5_tokenizer_from_cache_dir(tiny_models):
    tok = ft.load_t5_tokenizer(tiny_models["tokenizer_cache_dir"])
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.model_max_length == 512
    assert len(tok) <= 256  # fits the tiny T5's vocabulary


def test_missing_tokenizer_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "_from_hf_cache", lambda *a: None)  # as on a machine with a cold cache
    with pytest.raises(ft.TokenizerNotFoundError, match="--tokenizer_cache_dir") as ei:
        ft.load_t5_tokenizer(tmp_path)
    assert "google_t5-v1_1-xxl" in str(ei.value) and str(tmp_path) in str(ei.value)
    monkeypatch.setattr(ft, "open_clip_bpe_path", lambda: None)
    with pytest.raises(ft.TokenizerNotFoundError, match="--tokenizer_cache_dir"):
        ft.load_clip_tokenizer(None)


def test_hf_cache_probe_is_offline_and_fast():
    from transformers import T5TokenizerFast

    t0 = time.monotonic()
    # transformers alone would return an empty tokenizer here instead of failing.
    assert ft._from_hf_cache(T5TokenizerFast, "fluxtrain-tests/no-such-tokenizer") is None
    assert time.monotonic() - t0 < 5.0


def test_empty_cache_subdir_is_not_a_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "_from_hf_cache", lambda *a: None)
    (tmp_path / ft.T5_DIRNAME).mkdir()
    (tmp_path / ft.CLIP_DIRNAME).mkdir()
    with pytest.raises(ft.TokenizerNotFoundError):
        ft.load_t5_tokenizer(tmp_path)
    assert ft.load_clip_tokenizer(tmp_path)("a photo of a cat").input_ids == CAT_IDS  # falls back to the wheel


def test_tokenize_shapes(encoder):
    tok = encoder.tokenize(["a photo of a cat", "sks dog in the forest at night"])
    assert tok["clip_ids"].shape == (2, 77) and tok["clip_ids"].dtype == torch.long
    assert tok["t5_ids"].shape == (2, 24) and tok["t5_attn_mask"].shape == (2, 24)
    assert tok["t5_attn_mask"][0].sum() < 24 and set(tok["t5_attn_mask"].unique().tolist()) <= {0, 1}


def test_encode_outputs(encoder):
    out = encoder.encode(["a photo of a cat", "sks dog"])
    assert out["l_pooled"].shape == (2, 64) and out["t5_out"].shape == (2, 24, 64)
    assert out["txt_ids"].shape == (2, 24, 3) and not out["txt_ids"].any()
    assert out["t5_attn_mask"].shape == (2, 24)
    assert not out["t5_out"].requires_grad and torch.isfinite(out["t5_out"]).all()
    assert not torch.equal(out["l_pooled"][0], out["l_pooled"][1])
    masked = FluxTextEncoder(encoder.clip_tokenizer, encoder.t5_tokenizer, encoder.clip_model, encoder.t5_model,
                             t5_max_length=24, apply_t5_attn_mask=True).encode(["a photo of a cat"])
    assert not torch.allclose(masked["t5_out"][0], out["t5_out"][0])  # padding no longer attended


def test_clip_gradients_flow_when_trained(encoder):
    clip = encoder.clip_model
    clip.requires_grad_(True)
    try:
        ids = encoder.tokenize(["a photo of a cat"])["clip_ids"]
        encoder.encode_clip(ids).pow(2).sum().backward()
        grad = clip.get_input_embeddings().weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        clip.requires_grad_(False)
        clip.zero_grad(set_to_none=True)


def test_missing_model_is_a_clear_error(encoder):
    te = FluxTextEncoder(encoder.clip_tokenizer, encoder.t5_tokenizer, None, None, t5_max_length=8,
                         apply_t5_attn_mask=False)
    with pytest.raises(RuntimeError, match="--clip_l"):
        te.encode(["x"])


def test_pack_unpack_and_ids():
    lat = torch.randn(2, 16, 6, 10)
    packed = pack_latents(lat)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), lat)
    assert torch.equal(packed[0, 0, :4], lat[0, 0, :2, :2].flatten())  # channel-major inside a 2x2 patch
    ids = image_ids(6, 10, 2)
    assert ids.shape == (15, 3) and ids[:, 0].eq(0).all()
    assert ids[6].tolist() == [0.0, 1.0, 1.0] and ids[-1].tolist() == [0.0, 2.0, 4.0]
    from diffusers import FluxPipeline

    ref = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(ids, ref)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 16, 6, 10))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 8))
