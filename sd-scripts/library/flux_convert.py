"""Key conversion between FLUX checkpoint layouts, and model configs inferred from tensor shapes.

- BFL single-file transformer keys (`double_blocks.N.img_attn.qkv.weight`, ...) <-> diffusers
  `FluxTransformer2DModel` keys, one tensor at a time, for any width (nothing assumes 3072).
- LDM/BFL autoencoder keys (`ae.sft`: `encoder.down.0.block.0...`) <-> diffusers `AutoencoderKL`.
- Configs (diffusers config dicts) inferred from `{key: shape}` maps, so a header is enough.
Pure functions over dicts of tensors or shapes; no file I/O here.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from library.errors import BadFileError

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# BFL module -> diffusers module, for modules whose tensors are only renamed.
_GLOBAL_RENAMES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# Every Linear of a BFL block -> the diffusers module(s) holding its rows, fused ones (qkv = cat(q, k, v);
# linear1 = cat(q, k, v, mlp_in)) in row order. Listed in upstream LoRA module order: the LoRA network
# (networks/lora_flux.py) names and hooks its modules from these same tables.
DOUBLE_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_DOUBLE_RENAMES = {k: v[0] for k, v in DOUBLE_BLOCK_LINEARS.items() if len(v) == 1}
_DOUBLE_FUSED = {k: v for k, v in DOUBLE_BLOCK_LINEARS.items() if len(v) > 1}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_RENAMES = {k: v[0] for k, v in SINGLE_BLOCK_LINEARS.items() if len(v) == 1}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_FUSED = SINGLE_BLOCK_LINEARS["linear1"]
_FINAL_MOD = "final_layer.adaLN_modulation.1"

_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


class ConversionError(BadFileError):
    """A state dict does not have the layout the converter expects."""


def strip_bfl_prefix(keys: Iterable[str]) -> tuple[dict[str, str], str]:
    """Map stripped key -> original key. When a known prefix is present, keys without it are dropped
    (all-in-one checkpoints also carry VAE / text-encoder tensors)."""
    keys = list(keys)
    for prefix in BFL_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}, prefix
    return {k: k for k in keys}, ""


def is_diffusers_flux_keys(keys: Iterable[str]) -> bool:
    return any(k.startswith(("transformer_blocks.", "x_embedder.")) for k in keys)


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _swap_halves(t):
    """BFL final modulation is (shift, scale); diffusers AdaLayerNormContinuous wants (scale, shift)."""
    import torch

    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _chunks(t, sizes):
    return [p.clone() for p in t.split(list(sizes), dim=0)]


def bfl_tensor_to_diffusers(key: str, tensor, hidden_size: int) -> list[tuple[str, object]]:
    """Convert one BFL tensor (prefix already stripped) into one or more diffusers tensors.
    Works tensor by tensor so a loader can cast/free as it goes."""
    if key.startswith(_FINAL_MOD + "."):
        return [("norm_out.linear." + key[len(_FINAL_MOD) + 1:], _swap_halves(tensor))]
    m = _BLOCK_RE.match(key)
    if m is None:
        module, param = _split_param(key)
        if module in _GLOBAL_RENAMES:
            return [(f"{_GLOBAL_RENAMES[module]}.{param}", tensor)]
        raise ConversionError(f"unexpected key in a FLUX transformer checkpoint: {key!r}")
    kind, idx, rest = m.groups()
    if kind == "double_blocks":
        base = f"transformer_blocks.{idx}."
        if rest in _DOUBLE_NORMS:
            return [(base + _DOUBLE_NORMS[rest], tensor)]
        module, param = _split_param(rest)
        if module in _DOUBLE_RENAMES:
            return [(f"{base}{_DOUBLE_RENAMES[module]}.{param}", tensor)]
        if module in _DOUBLE_FUSED:
            parts = _chunks(tensor, [tensor.shape[0] // 3] * 3)
            return [(f"{base}{name}.{param}", p) for name, p in zip(_DOUBLE_FUSED[module], parts)]
    else:
        base = f"single_transformer_blocks.{idx}."
        if rest in _SINGLE_NORMS:
            return [(base + _SINGLE_NORMS[rest], tensor)]
        module, param = _split_param(rest)
        if module in _SINGLE_RENAMES:
            return [(f"{base}{_SINGLE_RENAMES[module]}.{param}", tensor)]
        if module == "linear1":
            h = hidden_size
            parts = _chunks(tensor, [h, h, h, tensor.shape[0] - 3 * h])
            return [(f"{base}{name}.{param}", p) for name, p in zip(_SINGLE_FUSED, parts)]
    raise ConversionError(f"unexpected key in a FLUX transformer checkpoint: {key!r}")


def bfl_to_diffusers(sd: Mapping[str, object]) -> dict[str, object]:
    """Whole-dict BFL -> diffusers (a `model.diffusion_model.` prefix is stripped)."""
    keymap, _ = strip_bfl_prefix(sd.keys())
    if "img_in.weight" not in keymap:
        raise ConversionError("not a BFL FLUX transformer state dict: no 'img_in.weight'")
    hidden = sd[keymap["img_in.weight"]].shape[0]
    out: dict[str, object] = {}
    for key, orig in keymap.items():
        out.update(bfl_tensor_to_diffusers(key, sd[orig], hidden))
    return out


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def diffusers_to_bfl(sd: Mapping[str, object]) -> dict[str, object]:
    """Whole-dict diffusers -> BFL (fused qkv / linear1 rebuilt by concatenation)."""
    import torch

    g_inv, d_inv, s_inv = _inverse(_GLOBAL_RENAMES), _inverse(_DOUBLE_RENAMES), _inverse(_SINGLE_RENAMES)
    dn_inv, sn_inv = _inverse(_DOUBLE_NORMS), _inverse(_SINGLE_NORMS)
    fused_parts: dict[str, dict[str, object]] = {}  # bfl key -> {diffusers part name: tensor}
    out: dict[str, object] = {}
    for key, t in sd.items():
        if key.startswith("norm_out.linear."):
            out[f"{_FINAL_MOD}.{key.rpartition('.')[2]}"] = _swap_halves(t)
            continue
        m = _DIFF_BLOCK_RE.match(key)
        if m is None:
            module, param = _split_param(key)
            if module not in g_inv:
                raise ConversionError(f"unexpected key in a diffusers FLUX transformer: {key!r}")
            out[f"{g_inv[module]}.{param}"] = t
            continue
        kind, idx, rest = m.groups()
        module, param = _split_param(rest)
        if kind == "transformer_blocks":
            base = f"double_blocks.{idx}."
            if rest in dn_inv:
                out[base + dn_inv[rest]] = t
            elif module in d_inv:
                out[f"{base}{d_inv[module]}.{param}"] = t
            else:
                fused = next((f for f, names in _DOUBLE_FUSED.items() if module in names), None)
                if fused is None:
                    raise ConversionError(f"unexpected key in a diffusers FLUX transformer: {key!r}")
                fused_parts.setdefault(f"{base}{fused}.{param}", {})[module] = t
        else:
            base = f"single_blocks.{idx}."
            if rest in sn_inv:
                out[base + sn_inv[rest]] = t
            elif module in s_inv:
                out[f"{base}{s_inv[module]}.{param}"] = t
            elif module in _SINGLE_FUSED:
                fused_parts.setdefault(f"{base}linear1.{param}", {})[module] = t
            else:
                raise ConversionError(f"unexpected key in a diffusers FLUX transformer: {key!r}")
    for bfl_key, parts in fused_parts.items():
        order = _SINGLE_FUSED if ".linear1." in bfl_key else _DOUBLE_FUSED[bfl_key.split(".", 2)[2].rsplit(".", 1)[0]]
        missing = [n for n in order if n not in parts]
        if missing:
            raise ConversionError(f"cannot rebuild {bfl_key}: missing diffusers parts {missing}")
        out[bfl_key] = torch.cat([parts[n] for n in order], dim=0)
    return out


# ---------------------------------------------------------------- config inference (transformer)

def axes_dims_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (time, height, width) summing to head_dim: real FLUX 128 -> (16, 56, 56).
    Every axis must be even for the rotary embedding."""
    def even(x: int) -> int:
        return max(2, x - x % 2)

    a0 = even(head_dim // 8)
    a1 = even((head_dim - a0) // 2)
    a2 = head_dim - a0 - a1
    if a2 < 2 or a2 % 2:
        raise ConversionError(f"attention head dim {head_dim} cannot be split into even RoPE axes")
    return a0, a1, a2


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_flux_config(shapes: Mapping[str, tuple]) -> dict:
    """diffusers FluxTransformer2DModel config from BFL key shapes (prefix stripped)."""
    need = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale", "final_layer.linear.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ConversionError(f"not a FLUX transformer checkpoint (missing {', '.join(missing)})")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if hidden % head_dim:
        raise ConversionError(f"hidden size {hidden} is not a multiple of head dim {head_dim}")
    mlp = shapes.get("double_blocks.0.img_mlp.0.weight", (4 * hidden,))[0]
    if mlp != 4 * hidden:
        raise ConversionError(f"MLP width {mlp} is not 4x hidden size {hidden}; unsupported FLUX variant")
    out_channels = shapes["final_layer.linear.weight"][0]
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels) if out_channels != in_channels else None,
        "num_layers": _count_blocks(shapes, "double_blocks."),
        "num_single_layers": _count_blocks(shapes, "single_blocks."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(shapes["txt_in.weight"][1]),
        "pooled_projection_dim": int(shapes["vector_in.in_layer.weight"][1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": list(axes_dims_for_head_dim(int(head_dim))),
    }


# ---------------------------------------------------------------- autoencoder (LDM/BFL <-> diffusers)

_AE_RESNET = {"nin_shortcut": "conv_shortcut"}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ae_count(shapes: Iterable[str], prefix: str) -> int:
    return _count_blocks(shapes, prefix)


def _ae_key_ldm_to_diffusers(key: str, num_up: int) -> str:
    side, _, rest = key.partition(".")
    parts = rest.split(".")
    if parts[0] in ("conv_in", "conv_out"):
        return key
    if parts[0] == "norm_out":
        return f"{side}.conv_norm_out.{parts[1]}"
    if parts[0] in ("down", "up"):
        i = int(parts[1])
        blk = f"down_blocks.{i}" if parts[0] == "down" else f"up_blocks.{num_up - 1 - i}"
        if parts[2] == "block":
            layer = _AE_RESNET.get(parts[4], parts[4])
            return f"{side}.{blk}.resnets.{parts[3]}.{layer}.{parts[5]}"
        if parts[2] in ("downsample", "upsample"):
            sampler = "downsamplers" if parts[2] == "downsample" else "upsamplers"
            return f"{side}.{blk}.{sampler}.0.conv.{parts[4]}"
    if parts[0] == "mid":
        if parts[1] in ("block_1", "block_2"):
            j = int(parts[1][-1]) - 1
            return f"{side}.mid_block.resnets.{j}.{_AE_RESNET.get(parts[2], parts[2])}.{parts[3]}"
        if parts[1] == "attn_1":
            return f"{side}.mid_block.attentions.0.{_AE_ATTN[parts[2]]}.{parts[3]}"
    raise ConversionError(f"unexpected key in an autoencoder checkpoint: {key!r}")


def ae_ldm_to_diffusers(sd: Mapping[str, object], num_up: int | None = None) -> dict[str, object]:
    """LDM/BFL `ae.sft` keys -> diffusers AutoencoderKL keys (attention 1x1 convs -> linears).
    `num_up` (decoder up levels) is needed when converting a partial dict, since up levels are reversed."""
    num_up = num_up if num_up is not None else _ae_count(sd.keys(), "decoder.up.")
    out = {}
    for key, t in sd.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = t
            continue
        new = _ae_key_ldm_to_diffusers(key, num_up)
        if ".attentions.0.to_" in new and new.endswith(".weight") and t.dim() == 4:
            t = t[:, :, 0, 0].clone()
        out[new] = t
    return out


def ae_diffusers_to_ldm(sd: Mapping[str, object]) -> dict[str, object]:
    """Inverse of `ae_ldm_to_diffusers` (linears -> 1x1 convs)."""
    num_up = _ae_count(sd.keys(), "decoder.up_blocks.")
    inv_res, inv_attn = _inverse(_AE_RESNET), _inverse(_AE_ATTN)
    out = {}
    for key, t in sd.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = t
            continue
        side, _, rest = key.partition(".")
        p = rest.split(".")
        if p[0] in ("conv_in", "conv_out"):
            new = key
        elif p[0] == "conv_norm_out":
            new = f"{side}.norm_out.{p[1]}"
        elif p[0] in ("down_blocks", "up_blocks"):
            i = int(p[1])
            blk = f"down.{i}" if p[0] == "down_blocks" else f"up.{num_up - 1 - i}"
            if p[2] == "resnets":
                new = f"{side}.{blk}.block.{p[3]}.{inv_res.get(p[4], p[4])}.{p[5]}"
            else:
                new = f"{side}.{blk}.{'downsample' if p[2] == 'downsamplers' else 'upsample'}.conv.{p[5]}"
        elif p[0] == "mid_block" and p[1] == "resnets":
            new = f"{side}.mid.block_{int(p[2]) + 1}.{inv_res.get(p[3], p[3])}.{p[4]}"
        elif p[0] == "mid_block" and p[1] == "attentions":
            module = ".".join(p[3:-1])
            new = f"{side}.mid.attn_1.{inv_attn[module]}.{p[-1]}"
            if p[-1] == "weight" and t.dim() == 2:
                t = t[:, :, None, None].clone()
        else:
            raise ConversionError(f"unexpected key in a diffusers AutoencoderKL: {key!r}")
        out[new] = t
    return out


def infer_ae_config(shapes: Mapping[str, tuple]) -> dict:
    """diffusers AutoencoderKL config from LDM/BFL AE key shapes.
    GroupNorm groups cannot be read from shapes: 32 (as in every real SD/FLUX AE) unless the
    narrowest block is smaller, then that width (tiny test models)."""
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_out.weight" not in shapes:
        raise ConversionError("not an autoencoder checkpoint (no encoder.conv_in / decoder.conv_out)")
    n_down = _ae_count(shapes, "encoder.down.")
    channels = [int(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(n_down)]
    layers = _ae_count(shapes, "encoder.down.0.block.")
    return {
        "in_channels": int(shapes["encoder.conv_in.weight"][1]),
        "out_channels": int(shapes["decoder.conv_out.weight"][0]),
        "down_block_types": ["DownEncoderBlock2D"] * n_down,
        "up_block_types": ["UpDecoderBlock2D"] * n_down,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": int(shapes["encoder.conv_out.weight"][0]) // 2,
        "norm_num_groups": min(32, min(channels)),
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    }
