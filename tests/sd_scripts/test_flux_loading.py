"""FLUX model files: tiny builder, key conversion, and loading through the real code paths."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library import flux_convert as fc
from library import flux_loading as fl
from library.flux_packing import image_ids, pack_latents

TINY_FILES = ("unet/flux-demo.safetensors", "clip/demo_clip_l.safetensors",
              "clip/demo_t5xxl_fp16.safetensors", "vae/demo_ae.sft")


@pytest.fixture(scope="module")
def dit(tiny_models):
    return fl.load_flow_model(tiny_models["unet"], dtype=torch.float32)


def _forward(model, dtype=torch.float32, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    lat = torch.randn(batch, 16, 8, 8, generator=g)
    txt = torch.randn(batch, 12, cfg.joint_attention_dim, generator=g)
    vec = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return model(hidden_states=pack_latents(lat).to(dtype), encoder_hidden_states=txt.to(dtype),
                 pooled_projections=vec.to(dtype), timestep=torch.full((batch,), 0.5),
                 img_ids=image_ids(8, 8), txt_ids=torch.zeros(12, 3),
                 guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None).sample


def _params(model) -> dict:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- builder

def test_builder_writes_expected_files_deterministically(tiny_models, tmp_path):
    root = Path(tiny_models["unet"]).parents[1]
    for rel in TINY_FILES:
        assert (root / rel).stat().st_size > 1000, rel
    assert (Path(tiny_models["tokenizer_cache_dir"]) / "openai_clip-vit-large-patch14" / "tokenizer.json").is_file()
    assert (Path(tiny_models["tokenizer_cache_dir"]) / "google_t5-v1_1-xxl" / "tokenizer.json").is_file()

    from fluxgym.tiny_flux import build_tiny_models

    t0 = time.monotonic()
    again = build_tiny_models(tmp_path / "a", seed=0)
    assert time.monotonic() - t0 < 10.0
    for rel in TINY_FILES + ("tokenizers/demo/google_t5-v1_1-xxl/tokenizer.json",
                             "tokenizers/demo/openai_clip-vit-large-patch14/tokenizer.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (root / rel).read_bytes(), rel
    other = build_tiny_models(tmp_path / "b", seed=1)
    assert other["unet"].read_bytes() != again["unet"].read_bytes()


def test_builder_is_idempotent_and_repairs_damaged_files(tmp_path):
    from fluxgym.tiny_flux import build_tiny_models

    paths = build_tiny_models(tmp_path, seed=0)
    stamps = {k: paths[k].stat().st_mtime_ns for k in ("unet", "clip_l", "t5xxl", "ae")}
    good = paths["ae"].read_bytes()
    build_tiny_models(tmp_path, seed=0)
    assert {k: paths[k].stat().st_mtime_ns for k in stamps} == stamps
    paths["ae"].write_bytes(good[: len(good) // 2])  # truncated download / crash mid-write
    build_tiny_models(tmp_path, seed=0)
    assert paths["ae"].read_bytes() == good
    assert stamps["unet"] == paths["unet"].stat().st_mtime_ns
    assert not list(tmp_path.rglob(".*tmp*"))


# ---------------------------------------------------------------- transformer

def test_analyze_reads_architecture_from_header(tiny_models):
    info = fl.analyze_flux_checkpoint(tiny_models["unet"])
    assert (info.hidden_size, info.num_heads, info.head_dim) == (64, 2, 32)
    assert (info.depth, info.depth_single, info.in_channels) == (2, 2, 64)
    assert (info.context_dim, info.vec_dim) == (64, 64)
    assert sum(info.axes_dims_rope) == info.head_dim and all(a % 2 == 0 for a in info.axes_dims_rope)
    assert info.guidance_embeds and not info.is_schnell and not info.is_diffusers
    assert info.dtype_name == "bfloat16"


def test_axes_rule_matches_real_flux():
    assert fc.axes_dims_for_head_dim(128) == (16, 56, 56)
    for hd in (16, 32, 64, 96, 256):
        axes = fc.axes_dims_for_head_dim(hd)
        assert sum(axes) == hd and all(a % 2 == 0 and a > 0 for a in axes)


def test_load_flow_model_is_complete_and_runs(dit, tiny_models):
    assert not any(p.is_meta for p in dit.parameters())
    assert not any(p.requires_grad for p in dit.parameters())
    sd = load_file(str(tiny_models["unet"]))
    conv = fc.bfl_to_diffusers(sd)
    own = dit.state_dict()
    assert set(conv) == set(own)
    assert all(torch.equal(conv[k].float(), own[k]) for k in own)
    out = _forward(dit, batch=2)
    assert out.shape == (2, 16, 64) and torch.isfinite(out).all() and out.std() > 0


def test_bfl_diffusers_round_trip_is_exact(tiny_models):
    sd = load_file(str(tiny_models["unet"]))
    back = fc.diffusers_to_bfl(fc.bfl_to_diffusers(sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_final_layer_modulation_is_swapped():
    sd = {"final_layer.adaLN_modulation.1.weight": torch.arange(8.0).reshape(4, 2)}
    out = fc.bfl_tensor_to_diffusers("final_layer.adaLN_modulation.1.weight", sd[next(iter(sd))], 2)
    assert out[0][0] == "norm_out.linear.weight"
    assert torch.equal(out[0][1], torch.tensor([[4.0, 5], [6, 7], [0, 1], [2, 3]]))


def test_prefixed_all_in_one_file_loads_same_weights(dit, tiny_models, tmp_path):
    sd = load_file(str(tiny_models["unet"]))
    mixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    mixed["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)  # other components ignored
    path = tmp_path / "flux-prefixed.safetensors"
    save_file(mixed, str(path))
    info = fl.analyze_flux_checkpoint(path)
    assert info.depth == 2 and info.hidden_size == 64
    model = fl.load_flow_model(path, dtype=torch.float32)
    a, b = _params(model), _params(dit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_file_and_fp8_storage(dit, tiny_models, tmp_path):
    sd = load_file(str(tiny_models["unet"]))
    path = tmp_path / "flux-fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, str(path))
    assert fl.analyze_flux_checkpoint(path).dtype_name == "float8_e4m3fn"
    up = fl.load_flow_model(path, dtype=torch.bfloat16)  # fp8 file, upcast for compute
    assert {p.dtype for p in up.parameters()} == {torch.bfloat16}

    model = fl.load_flow_model(tiny_models["unet"], dtype=torch.bfloat16, fp8=True)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["transformer_blocks.0.attn.to_q.weight"] == torch.float8_e4m3fn
    assert dtypes["single_transformer_blocks.0.proj_mlp.weight"] == torch.float8_e4m3fn
    assert set(dtypes.values()) == {torch.float8_e4m3fn, torch.bfloat16}
    # A trainable delta outside the frozen fp8 model still gets gradients.
    delta = torch.zeros(1, 16, 64, requires_grad=True)
    cfg = model.config
    out = model(hidden_states=(torch.randn(1, 16, 64) + delta).to(torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 12, cfg.joint_attention_dim, dtype=torch.bfloat16),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=torch.bfloat16),
                timestep=torch.full((1,), 0.5), img_ids=image_ids(8, 8), txt_ids=torch.zeros(12, 3),
                guidance=torch.full((1,), 3.5)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    ref = _forward(dit)
    fp8_out = _forward(model, dtype=torch.bfloat16).float()
    assert torch.corrcoef(torch.stack([ref.flatten(), fp8_out.flatten()]))[0, 1] > 0.5


def test_diffusers_folder_variant(dit, tiny_models, tmp_path):
    pipe = tmp_path / "pipe"
    dit.save_pretrained(str(pipe / "transformer"))
    info = fl.analyze_flux_checkpoint(pipe)
    assert info.is_diffusers and info.depth == 2 and info.head_dim == 32
    model = fl.load_flow_model(pipe, dtype=torch.float32)
    a, b = _params(model), _params(dit)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ae = fl.load_ae(tiny_models["ae"], dtype=torch.float32)
    ae.save_pretrained(str(pipe / "vae"))
    ae2 = fl.load_ae(pipe, dtype=torch.float32)
    a, b = _params(ae2), _params(ae)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_schnell_detected_without_guidance(tiny_models, tmp_path):
    sd = {k: v for k, v in load_file(str(tiny_models["unet"])).items() if not k.startswith("guidance_in.")}
    path = tmp_path / "schnell.safetensors"
    save_file(sd, str(path))
    info = fl.analyze_flux_checkpoint(path)
    assert info.is_schnell and not info.guidance_embeds
    model = fl.load_flow_model(path, dtype=torch.float32)
    assert torch.isfinite(_forward(model)).all()


# ---------------------------------------------------------------- autoencoder and text encoders

def test_ae_matches_diffusers_single_file_reader_and_round_trips(tiny_models, tmp_path):
    from diffusers import AutoencoderKL

    ae = fl.load_ae(tiny_models["ae"], dtype=torch.float32)
    assert ae.config.latent_channels == 16 and ae.config.scaling_factor == pytest.approx(0.3611)
    # Independent check of our key mapping: diffusers' own LDM reader with our (local) config.
    cfg_dir = tmp_path / "vae_cfg"
    ae.save_config(str(cfg_dir))
    (tmp_path / "ae.safetensors").write_bytes(Path(tiny_models["ae"]).read_bytes())
    ref = AutoencoderKL.from_single_file(str(tmp_path / "ae.safetensors"), config=str(cfg_dir),
                                         local_files_only=True)
    a, b = _params(ae), _params(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ldm = load_file(str(tiny_models["ae"]))
    back = fc.ae_diffusers_to_ldm(fc.ae_ldm_to_diffusers(ldm))
    assert back.keys() == ldm.keys() and all(torch.equal(back[k], ldm[k]) for k in ldm)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    lat = fl.encode_latents(ae, img, torch.Generator().manual_seed(0))
    assert lat.shape == (1, 16, 8, 8)
    from library import sampling

    assert sampling._decode(ae, lat, "cpu").size == (64, 64)  # the sampler's inverse of encode_latents


def test_clip_and_t5_configs_and_layouts(tiny_models, tmp_path):
    clip = fl.load_clip_l(tiny_models["clip_l"], dtype=torch.float32)
    c = clip.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (64, 2, 1, 49408)
    assert c.max_position_embeddings == 77 and c.hidden_act == "quick_gelu"
    # Same weights saved without the `text_model.` prefix (transformers 5 layout) load identically.
    sd = {k.removeprefix("text_model."): v for k, v in load_file(str(tiny_models["clip_l"])).items()}
    save_file(sd, str(tmp_path / "clip_noprefix.safetensors"))
    clip2 = fl.load_clip_l(tmp_path / "clip_noprefix.safetensors", dtype=torch.float32)
    a, b = _params(clip), _params(clip2)
    assert all(torch.equal(a[k], b[k]) for k in a)

    t5 = fl.load_t5xxl(tiny_models["t5xxl"], dtype=torch.float32)
    t = t5.config
    assert (t.d_model, t.num_layers, t.num_heads, t.d_kv, t.d_ff) == (64, 2, 2, 32, 128)
    assert t.is_gated_act and t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    sd = load_file(str(tiny_models["t5xxl"]))
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    save_file(sd, str(tmp_path / "t5_embed.safetensors"))
    t5b = fl.load_t5xxl(tmp_path / "t5_embed.safetensors", dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.equal(t5(input_ids=ids).last_hidden_state, t5b(input_ids=ids).last_hidden_state)


# ---------------------------------------------------------------- user errors

@pytest.mark.parametrize("loader,flag", [
    (lambda p: fl.load_flow_model(p, dtype=torch.float32), "--pretrained_model_name_or_path"),
    (lambda p: fl.analyze_flux_checkpoint(p), "--pretrained_model_name_or_path"),
    (lambda p: fl.load_ae(p, dtype=torch.float32), "--ae"),
    (lambda p: fl.load_clip_l(p, dtype=torch.float32), "--clip_l"),
    (lambda p: fl.load_t5xxl(p, dtype=torch.float32), "--t5xxl"),
])
def test_missing_file_names_flag(loader, flag, tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(fl.ModelFileError) as ei:
        loader(missing)
    assert flag in str(ei.value) and str(missing) in str(ei.value)


def test_wrong_kind_truncated_and_pickle_files(tiny_models, tmp_path):
    with pytest.raises(fl.ModelFileError, match="--pretrained_model_name_or_path.*does not look like"):
        fl.load_flow_model(tiny_models["ae"], dtype=torch.float32)
    with pytest.raises(fl.ModelFileError, match="--ae"):
        fl.load_ae(tiny_models["unet"], dtype=torch.float32)
    with pytest.raises(fl.ModelFileError, match="--t5xxl"):
        fl.load_t5xxl(tiny_models["clip_l"], dtype=torch.float32)
    data = Path(tiny_models["unet"]).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:5000])
    with pytest.raises(fl.ModelFileError, match="cannot read"):
        fl.load_flow_model(cut, dtype=torch.float32)
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(b"\x80\x04")
    with pytest.raises(fl.ModelFileError, match="pickle"):
        fl.analyze_flux_checkpoint(pkl)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(fl.ModelFileError, match="no .safetensors"):
        fl.load_flow_model(empty_dir, dtype=torch.float32)


def test_builder_cli(tmp_path, capsys):
    import json

    from fluxgym.tiny_flux import main

    assert main([str(tmp_path), "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert set(paths) == {"unet", "clip_l", "t5xxl", "ae", "tokenizer_cache_dir"}
    assert all(Path(p).exists() for p in paths.values())
    with pytest.raises(SystemExit) as ei:
        main([str(tmp_path), "--width", "huge"])
    assert ei.value.code == 2


def test_streamed_read_equals_memory_mapped_read(dit, tiny_models):
    streamed = fl.load_flow_model(tiny_models["unet"], dtype=torch.float32, disable_mmap=True)
    a, b = _params(streamed), _params(dit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = dict(fl._stream_file(Path(tiny_models["t5xxl"])))
    ref = load_file(str(tiny_models["t5xxl"]))
    assert raw.keys() == ref.keys() and all(torch.equal(raw[k], ref[k]) and raw[k].dtype == ref[k].dtype for k in ref)
