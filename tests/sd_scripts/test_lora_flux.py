"""Kohya-format FLUX LoRA: key names/shapes, hook maths, save/load, and diffusers' reading of our files.

Models are tiny diffusers/transformers modules built here from seeded configs (hidden 32, 2 double +
3 single blocks, 2-layer CLIP), so every shape below is FLUX.1's table scaled from 3072 to 32.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks import lora_flux

HID, MLP, R, ALPHA = 32, 128, 4, 2.0
N_DOUBLE, N_SINGLE, N_CLIP = 2, 3, 2
DOUBLE_SUFFIXES = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                   "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"]
SINGLE_SUFFIXES = ["linear1", "linear2", "modulation_lin"]
TE_SUFFIXES = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
# (in, out) per kohya module: FLUX.1 sizes with 3072 -> HID, 12288 -> MLP.
SHAPES = {"img_attn_qkv": (HID, 3 * HID), "img_attn_proj": (HID, HID), "img_mlp_0": (HID, MLP),
          "img_mlp_2": (MLP, HID), "img_mod_lin": (HID, 6 * HID), "linear1": (HID, 3 * HID + MLP),
          "linear2": (HID + MLP, HID), "modulation_lin": (HID, 3 * HID),
          "self_attn_q_proj": (16, 16), "self_attn_out_proj": (16, 16), "mlp_fc1": (16, 32), "mlp_fc2": (32, 16)}
for _s in ("txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"):
    SHAPES[_s] = SHAPES["img" + _s[3:]]
SHAPES["self_attn_k_proj"] = SHAPES["self_attn_v_proj"] = SHAPES["self_attn_q_proj"]

# BFL semantics written out independently of the module under test: fused rows in this order.
DIFFUSERS_OF = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"], "img_mlp_2": ["ff.net.2"], "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"], "txt_mlp_2": ["ff_context.net.2"], "txt_mod_lin": ["norm1_context.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}


def make_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=N_DOUBLE, num_single_layers=N_SINGLE,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return model.eval()


def make_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=N_CLIP,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def flux_inputs(seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    return dict(hidden_states=torch.randn(2, n_img, 64, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(2, 32, generator=g).to(dtype),
                timestep=torch.tensor([0.3, 0.8], dtype=dtype), guidance=torch.tensor([3.5, 3.5], dtype=dtype),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                   indexing="ij"), -1).reshape(-1, 3).to(dtype),
                txt_ids=torch.zeros(n_txt, 3, dtype=dtype), return_dict=False)


def run(model, dtype=torch.float32):
    with torch.no_grad():
        return model(**flux_inputs(dtype=dtype))[0]


def perturb(network, seed=5, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def expected_names(train_blocks="all", te=False):
    names = []
    if train_blocks in ("all", "double"):
        names += [f"lora_unet_double_blocks_{i}_{s}" for i in range(N_DOUBLE) for s in DOUBLE_SUFFIXES]
    if train_blocks in ("all", "single"):
        names += [f"lora_unet_single_blocks_{i}_{s}" for i in range(N_SINGLE) for s in SINGLE_SUFFIXES]
    if te:
        names += [f"lora_te1_text_model_encoder_layers_{i}_{s}" for i in range(N_CLIP) for s in TE_SUFFIXES]
    return names


@pytest.fixture(scope="module")
def flux():
    return make_flux()


@pytest.fixture(scope="module")
def clip():
    return make_clip()


@pytest.mark.parametrize("train_blocks", ["all", "single", "double"])
@pytest.mark.parametrize("with_te", [False, True])
def test_keys_shapes_and_counts_match_kohya(flux, clip, train_blocks, with_te):
    net = lora_flux.create_network(1.0, R, ALPHA, None, [clip if with_te else None, None], flux,
                                   train_blocks=train_blocks)
    names = expected_names(train_blocks, with_te)
    sd = net.state_dict()
    assert set(sd) == {f"{n}.{leaf}" for n in names for leaf in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(sd) == 3 * len(names)
    for name in names:
        fan_in, fan_out = SHAPES[_suffix(name)]
        assert sd[f"{name}.lora_down.weight"].shape == (R, fan_in), name
        assert sd[f"{name}.lora_up.weight"].shape == (fan_out, R), name
        assert sd[f"{name}.alpha"].shape == () and float(sd[f"{name}.alpha"]) == ALPHA
        assert torch.count_nonzero(sd[f"{name}.lora_up.weight"]) == 0
        assert torch.count_nonzero(sd[f"{name}.lora_down.weight"]) > 0
    assert net.is_te_trained == with_te
    assert net.unet_module_names == [n for n in names if n.startswith("lora_unet")]
    assert net.te_module_names == [n for n in names if n.startswith("lora_te1")]
    assert net.kohya_state_dict().keys() == sd.keys()


def _suffix(name):
    for s in DOUBLE_SUFFIXES + SINGLE_SUFFIXES + TE_SUFFIXES:
        if name.endswith("_" + s):
            return s
    raise AssertionError(name)


def test_unet_only_drops_te_modules(flux, clip):
    net = lora_flux.create_network(1.0, R, ALPHA, None, [clip, None], flux, train_blocks="double")
    net.apply_to([clip, None], flux, apply_text_encoder=False, apply_unet=True)
    try:
        assert not net.is_te_trained
        assert not any(k.startswith("lora_te1") for k in net.state_dict())
        assert len(net.state_dict()) == 3 * 10 * N_DOUBLE
        assert {p.data_ptr() for p in net.get_trainable_params()} == {p.data_ptr() for p in net.parameters()}
    finally:
        net.remove_hooks()


def test_defaults_rank_4_alpha_1_and_alpha_zero_means_rank(flux):
    net = lora_flux.create_network(1.0, None, None, None, None, flux, train_blocks="single")
    sd = net.state_dict()
    assert sd["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape == (4, HID + MLP)
    assert float(sd["lora_unet_single_blocks_0_linear2.alpha"]) == 1.0
    net0 = lora_flux.create_network(1.0, 8, 0, None, None, flux, train_blocks="single")
    assert float(net0.state_dict()["lora_unet_single_blocks_0_linear2.alpha"]) == 8.0
    assert net0.get_submodule("lora_unet_single_blocks_0_linear2").scale == 1.0


def test_zero_init_leaves_outputs_unchanged(flux, clip):
    base, base_te = run(flux), clip(torch.tensor([[0, 5, 7, 1]])).last_hidden_state
    net = lora_flux.create_network(1.0, R, ALPHA, None, [clip, None], flux)
    net.apply_to([clip, None], flux)
    try:
        assert torch.equal(run(flux), base)
        with torch.no_grad():
            assert torch.equal(clip(torch.tensor([[0, 5, 7, 1]])).last_hidden_state, base_te)
    finally:
        net.remove_hooks()
    assert torch.equal(run(flux), base)


def merged_copy(flux, network, multiplier=1.0):
    """Reference: fold scale * up @ down into the diffusers weights, splitting fused BFL rows in order."""
    ref = copy.deepcopy(flux)
    sd = network.state_dict()
    with torch.no_grad():
        for key in sd:
            if not key.endswith(".alpha"):
                continue
            name = key[: -len(".alpha")]
            down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
            delta = (up @ down) * multiplier * float(sd[key]) / down.shape[0]
            kind = _suffix(name)
            block = (ref.transformer_blocks if "double" in name else ref.single_transformer_blocks)[int(name.split("_")[4])]
            row = 0
            for path in DIFFUSERS_OF[kind]:
                lin = block.get_submodule(path)
                lin.weight += delta[row: row + lin.out_features]
                row += lin.out_features
            assert row == delta.shape[0], name
    return ref


def test_hooked_forward_equals_merged_weights(flux):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux)
    perturb(net)
    ref = merged_copy(flux, net)
    base = run(flux)
    net.apply_to(None, flux)
    net.apply_to(None, flux)  # idempotent: no second hook
    try:
        ours = run(flux)
        assert (ours - base).abs().max() > 1e-3  # the LoRA has a visible effect
        torch.testing.assert_close(ours, run(ref), atol=1e-5, rtol=0)
        net.set_multiplier(0.5)
        half = run(flux)
    finally:
        net.remove_hooks()
    torch.testing.assert_close(half, run(merged_copy(flux, net, 0.5)), atol=1e-5, rtol=0)
    net.apply_to(None, flux)  # re-applying after remove_hooks hooks again
    try:
        torch.testing.assert_close(run(flux), half, atol=0, rtol=0)
    finally:
        net.remove_hooks()


def test_single_linear1_rows_follow_bfl_order(flux):
    """BFL linear1 output = cat(q, k, v, mlp): the LoRA delta's rows must land in that order."""
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="single")
    perturb(net)
    lora = net.get_submodule("lora_unet_single_blocks_1_linear1")
    blk = flux.single_transformer_blocks[1]
    x = torch.randn(3, HID)
    with torch.no_grad():
        fused_w = torch.cat([blk.attn.to_q.weight, blk.attn.to_k.weight, blk.attn.to_v.weight, blk.proj_mlp.weight])
        fused_b = torch.cat([blk.attn.to_q.bias, blk.attn.to_k.bias, blk.attn.to_v.bias, blk.proj_mlp.bias])
        fused = x @ (fused_w + lora.lora_up.weight @ lora.lora_down.weight * (ALPHA / R)).T + fused_b
    net.apply_to(None, flux)
    try:
        with torch.no_grad():
            parts = [blk.attn.to_q(x), blk.attn.to_k(x), blk.attn.to_v(x), blk.proj_mlp(x)]
        torch.testing.assert_close(torch.cat(parts, -1), fused, atol=1e-6, rtol=0)
    finally:
        net.remove_hooks()


def test_clip_lora_matches_manual(clip):
    net = lora_flux.create_network(1.0, R, ALPHA, None, [clip, None], make_flux())
    perturb(net)
    lora = net.get_submodule("lora_te1_text_model_encoder_layers_1_mlp_fc1")
    fc1 = clip.text_model.encoder.layers[1].mlp.fc1 if hasattr(clip, "text_model") else clip.encoder.layers[1].mlp.fc1
    x = torch.randn(2, 16)
    with torch.no_grad():
        expect = fc1(x) + (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T) * (ALPHA / R)
    net.apply_to([clip, None], None, apply_unet=False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(fc1(x), expect, atol=1e-6, rtol=0)
    finally:
        net.remove_hooks()


def test_save_load_round_trip_is_exact(flux, tmp_path):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux)
    perturb(net)
    path = tmp_path / "lora.safetensors"
    save_file(net.kohya_state_dict(), str(path))
    fresh = lora_flux.create_network(1.0, R, ALPHA, None, None, flux)
    fresh.load_weights(path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    net2, sd = lora_flux.create_network_from_weights(1.0, str(path), None, None, flux)
    assert set(sd) == set(load_file(str(path)))
    for k, v in net.state_dict().items():
        assert torch.equal(net2.state_dict()[k], v), k
    # bf16 save keeps names and casts every tensor
    half = net.kohya_state_dict(torch.bfloat16)
    assert half.keys() == net.state_dict().keys() and {v.dtype for v in half.values()} == {torch.bfloat16}
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in half.values())


def test_from_weights_takes_rank_and_alpha_from_file(flux, tmp_path):
    src = lora_flux.create_network(1.0, 8, 3.0, None, None, flux, train_blocks="double")
    perturb(src)
    path = tmp_path / "r8.safetensors"
    save_file(src.kohya_state_dict(), str(path))
    net, _ = lora_flux.create_network_from_weights(1.0, str(path), None, [None, None], flux)
    assert net.unet_module_names == src.unet_module_names
    mod = net.get_submodule("lora_unet_double_blocks_1_txt_mlp_2")
    assert mod.rank == 8 and mod.scale == pytest.approx(3.0 / 8)
    src.apply_to(None, flux)
    try:
        expect = run(flux)
    finally:
        src.remove_hooks()
    net.apply_to(None, flux)
    try:
        assert torch.equal(run(flux), expect)
    finally:
        net.remove_hooks()


def test_mismatched_files_name_the_key(flux, tmp_path):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="double")
    good = net.kohya_state_dict()
    missing = dict(good)
    del missing["lora_unet_double_blocks_1_img_mlp_2.lora_up.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(missing, str(path))
    with pytest.raises(lora_flux.LoRAWeightsError, match=r"missing.safetensors.*lora_unet_double_blocks_1_img_mlp_2\.lora_up"):
        net.load_weights(path)
    extra = dict(good, **{"lora_unet_single_blocks_0_linear2.alpha": torch.tensor(1.0)})
    with pytest.raises(lora_flux.LoRAWeightsError, match="unexpected.*lora_unet_single_blocks_0_linear2.alpha"):
        net.load_weights(extra)
    wrong = dict(good)
    wrong["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"] = torch.zeros(8, HID)
    with pytest.raises(lora_flux.LoRAWeightsError, match=r"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight.*\(8, 32\)"):
        net.load_weights(wrong)
    with pytest.raises(lora_flux.LoRAWeightsError, match="not found"):
        net.load_weights(tmp_path / "nope.safetensors")
    alien = {"lora_unet_double_blocks_7_img_mlp_2.lora_down.weight": torch.zeros(4, MLP),
             "lora_unet_double_blocks_7_img_mlp_2.lora_up.weight": torch.zeros(HID, 4)}
    with pytest.raises(lora_flux.LoRAWeightsError, match="lora_unet_double_blocks_7_img_mlp_2"):
        lora_flux.create_network_from_weights(1.0, None, None, None, flux, weights_sd=alien)
    # the good dict still loads after all that
    net.load_weights(good)
    # non-strict (upstream's --network_weights): the common part loads, the rest is reported, not fatal
    partial = {k: v + 1 for k, v in good.items() if "img_mlp_2" not in k}
    partial["lora_unet_single_blocks_0_linear2.alpha"] = torch.tensor(1.0)
    missing_keys, extra_keys = net.load_weights(partial, strict=False)
    assert missing_keys and all("img_mlp_2" in k for k in missing_keys)
    assert extra_keys == ["lora_unet_single_blocks_0_linear2.alpha"]
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], partial[k]) for k in partial if k in loaded)
    with pytest.raises(lora_flux.LoRAWeightsError, match="has shape"):
        net.load_weights(wrong, strict=False)  # a shape mismatch stays an error


@pytest.mark.parametrize("args, pattern", [
    ({"train_blocks": "middle"}, "train_blocks"),
    ({"split_qkv": "True"}, "split_qkv is not supported"),
    ({"loraplus_lr_ratio": "16"}, "loraplus_lr_ratio is not supported"),
    ({"frobnicate": "1"}, "unknown key 'frobnicate'"),
])
def test_network_args_are_checked(flux, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        lora_flux.create_network(1.0, R, ALPHA, None, None, flux, **args)


def test_network_args_noop_defaults_accepted(flux):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, split_qkv="False", train_t5xxl="False",
                                   train_blocks="Single", verbose="True")
    assert len(net.unet_module_names) == 3 * N_SINGLE


def test_optimizer_groups(flux, clip):
    net = lora_flux.create_network(1.0, R, ALPHA, None, [clip, None], flux, train_blocks="single")
    groups = net.prepare_optimizer_params([5e-5, 1e-5], 1e-4, 2e-6)
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in net.parameters())
    groups = net.prepare_optimizer_params(None, None, 3e-4)
    assert [g["lr"] for g in groups] == [3e-4, 3e-4]
    net.apply_to([clip, None], flux, apply_text_encoder=False)
    net.remove_hooks()
    assert len(net.prepare_optimizer_params(1e-5, None, 1e-3)) == 1


def test_low_precision_base_keeps_fp32_lora_and_trains():
    """bf16 (and fp8-stored) base weights: LoRA params stay fp32, hooks compute in the input dtype, grads flow."""
    model = make_flux().to(torch.bfloat16).requires_grad_(False)
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, model)
    with torch.no_grad():
        for name in net.unet_module_names:
            net.get_submodule(name).lora_up.weight.normal_(0, 0.05)
    base = run(model, torch.bfloat16)
    net.apply_to(None, model)
    try:
        out = model(**flux_inputs(dtype=torch.bfloat16))[0]
        assert out.dtype == torch.bfloat16 and (out.float() - base.float()).abs().max() > 0
        out.float().square().mean().backward()
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
                   for p in net.parameters())
        assert not any(p.grad is not None for p in model.parameters())
    finally:
        net.remove_hooks()


def test_fp8_layerwise_casting_base():
    model = make_flux().to(torch.bfloat16).requires_grad_(False)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert torch.float8_e4m3fn in {p.dtype for p in model.parameters()}
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, model, train_blocks="double")
    perturb(net)
    base = run(model, torch.bfloat16)
    net.apply_to(None, model)
    try:
        out = model(**flux_inputs(dtype=torch.bfloat16))[0]
        assert (out.float() - base.float()).abs().max() > 1e-3
        out.float().mean().backward()
        assert all(p.grad is not None for p in net.parameters())
    finally:
        net.remove_hooks()


def test_alpha_reloaded_by_load_state_dict_updates_scale(flux):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="single")
    sd = net.state_dict()
    sd = {k: (torch.tensor(1.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    net.load_state_dict(sd)  # what accelerate.load_state does
    assert net.get_submodule("lora_unet_single_blocks_2_modulation_lin").scale == pytest.approx(1.0 / R)


def test_diffusers_reads_our_file_identically(flux, tmp_path):
    """diffusers' kohya converter hard-codes width 3072 for single-block linear1, so this tiny test uses
    train_blocks=double; the real-width test (test_real_width.py) covers single blocks."""
    from diffusers import FluxPipeline

    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="double")
    perturb(net)
    path = tmp_path / "kohya.safetensors"
    save_file(net.kohya_state_dict(), str(path))
    t0 = time.monotonic()
    converted = FluxPipeline.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert converted and all(k.startswith("transformer.") for k in converted)
    ref = copy.deepcopy(flux)
    with torch.no_grad():
        for key, a in converted.items():
            if not key.endswith(".lora_A.weight"):
                continue
            mod_path = key[len("transformer."): -len(".lora_A.weight")]
            b = converted[key.replace(".lora_A.", ".lora_B.")]
            ref.get_submodule(mod_path).weight += b @ a
    net.apply_to(None, flux)
    try:
        ours = run(flux)
    finally:
        net.remove_hooks()
    assert (ours - run(flux)).abs().max() > 1e-3
    assert (ours - run(ref)).abs().max() <= 1e-5
    assert time.monotonic() - t0 < 20


def test_diffusers_peft_loader_matches(flux, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_into_transformer needs peft (not a project dependency)")
    from diffusers import FluxPipeline

    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="double")
    perturb(net)
    path = tmp_path / "kohya.safetensors"
    save_file(net.kohya_state_dict(), str(path))
    sd = FluxPipeline.lora_state_dict(str(path))
    sd = sd[0] if isinstance(sd, tuple) else sd
    fresh = copy.deepcopy(flux)
    FluxPipeline.load_lora_into_transformer(sd, None, transformer=fresh)
    net.apply_to(None, flux)
    try:
        ours = run(flux)
    finally:
        net.remove_hooks()
    assert (ours - run(fresh)).abs().max() <= 1e-5


def _converted(kohya: dict, path) -> dict:
    from diffusers import FluxPipeline

    save_file(kohya, str(path))
    out = FluxPipeline.lora_state_dict(str(path))
    return out[0] if isinstance(out, tuple) else out


def test_real_width_mapping_matches_diffusers_converter(tmp_path):
    """At FLUX.1 width (3072) diffusers' converter also handles single blocks. The base blocks live on the
    meta device (no memory), so this compares per-layer effective deltas for all 13 module types."""
    from torch import nn
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    with torch.device("meta"):
        root = nn.Module()
        root.transformer_blocks = nn.ModuleList([FluxTransformerBlock(3072, 24, 128)])
        root.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(3072, 24, 128)])
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, root)
    assert len(net.unet_module_names) == 13
    sd = net.state_dict()
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, R)
    assert sd["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape == (R, 15360)
    assert sd["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"].shape == (18432, R)
    perturb(net)
    converted = _converted(net.kohya_state_dict(), tmp_path / "wide.safetensors")
    checked = 0
    for name in net.unet_module_names:
        lora = net.get_submodule(name)
        block = "transformer_blocks.0" if "double" in name else "single_transformer_blocks.0"
        row = 0
        for path in DIFFUSERS_OF[_suffix(name)]:
            rows = root.get_submodule(f"{block}.{path}").out_features
            # compare the rank-R deltas through random probes: (up @ down) @ v without forming 66M-entry matrices
            probe = torch.randn(lora.lora_down.in_features, 3, generator=torch.Generator().manual_seed(row))
            with torch.no_grad():
                ours = lora.lora_up.weight[row: row + rows] @ (lora.lora_down.weight @ probe) * lora.scale
                key = f"transformer.{block}.{path}"
                theirs = converted[f"{key}.lora_B.weight"] @ (converted[f"{key}.lora_A.weight"] @ probe)
            torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)
            row += rows
            checked += 1
    assert checked == (2 * 3 + 8) + (4 + 2)  # double: two qkv split in 3 + 8 plain; single: linear1 in 4 + 2
    assert checked * 2 == len(converted)


def test_neuron_dropout_only_in_training(flux):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, neuron_dropout=0.5, train_blocks="double")
    perturb(net)
    net.apply_to(None, flux)
    try:
        net.train()
        a, b = run(flux), run(flux)
        assert not torch.equal(a, b)
        net.eval()
        c, d = run(flux), run(flux)
        assert torch.equal(c, d)
    finally:
        net.remove_hooks()
    net.eval()
    torch.testing.assert_close(c, run(merged_copy(flux, net)), atol=1e-5, rtol=0)


def test_max_norm_regularization_caps_effective_delta(flux):
    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="single")
    perturb(net, std=0.5)
    scaled, mean_norm, max_norm = net.apply_max_norm_regularization(0.1)
    assert scaled == len(net.unet_module_names) and max_norm == pytest.approx(0.1, rel=1e-4)
    for lora in net.lora_modules():
        assert float((lora.lora_up.weight @ lora.lora_down.weight).detach().norm() * lora.scale) <= 0.1 * (1 + 1e-4)


def test_accelerate_save_state_writes_only_kohya_keys(flux, tmp_path):
    from accelerate import Accelerator

    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="double")
    perturb(net)
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(net.prepare_optimizer_params(None, None, 1e-3))
    pnet, opt = acc.prepare(net, opt)
    acc.save_state(str(tmp_path / "state"))
    saved = load_file(str(tmp_path / "state" / "model.safetensors"))
    assert saved.keys() == net.kohya_state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in net.kohya_state_dict().items())
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    acc.load_state(str(tmp_path / "state"))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())


def test_network_pickles_and_deep_copies(flux):
    import pickle

    net = lora_flux.create_network(1.0, R, ALPHA, None, None, flux, train_blocks="single")
    clone = pickle.loads(pickle.dumps(net))
    assert clone.state_dict().keys() == net.state_dict().keys()
    clone.load_state_dict({k: (torch.tensor(2.0 * R) if k.endswith(".alpha") else v)
                           for k, v in clone.state_dict().items()})
    assert clone.get_submodule("lora_unet_single_blocks_0_linear1").scale == 2.0
