"""Load FLUX model files (BFL single files, ComfyUI-style text encoders, `ae.sft`, diffusers folders).

- `analyze_flux_checkpoint`: architecture from the safetensors header only (no tensor data read).
- `load_flow_model` / `load_ae` / `load_clip_l` / `load_t5xxl`: build the model from a config inferred
  from tensor shapes (never a hub id), on the meta device, then assign converted tensors one by one.
- `encode_latents`: FLUX latent scaling (shift 0.1159, scale 0.3611); sampling's `_decode` inverts it.
Errors a user can fix raise `ModelFileError` naming the file and the command-line flag.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from library import flux_convert as fc
from library.flux_time_inputs import keep_time_inputs_float32
from library.errors import BadFileError

logger = logging.getLogger(__name__)

FLUX_FLAG = "--pretrained_model_name_or_path"
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_WEIGHT_SUFFIXES = (".safetensors", ".sft")
# Kept in `dtype` under fp8: the small input/output layers only. diffusers' default pattern ("norm")
# would also keep every block's modulation Linear (norm1.linear, ~27% of FLUX's weights) in bf16.
FP8_SKIP_PATTERNS = ("pos_embed", "^x_embedder$", "^context_embedder$", "^time_text_embed", "^norm_out", "^proj_out$")


class ModelFileError(BadFileError):
    """A model file is missing, unreadable or not the kind of model the flag expects."""


@dataclass
class FluxModelInfo:
    path: str
    is_diffusers: bool
    is_schnell: bool
    hidden_size: int
    num_heads: int
    head_dim: int
    depth: int
    depth_single: int
    in_channels: int
    context_dim: int
    vec_dim: int
    axes_dims_rope: tuple
    guidance_embeds: bool
    dtype_name: str
    config: dict | None = None  # diffusers config dict used to build the model
    files: tuple = ()


# ---------------------------------------------------------------- file helpers

def weight_files(path, flag: str, kind: str, subfolders: tuple[str, ...]) -> list[Path]:
    p = Path(path) if path else None
    if p is None or not p.exists():
        raise ModelFileError(f"{flag}: {kind} file not found: {path}. Check the path (absolute paths are safest).")
    if p.is_dir():
        for sub in (*subfolders, ""):
            files = sorted(f for f in (p / sub).glob("*") if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
            if files:
                return files
        raise ModelFileError(f"{flag}: folder {p} holds no .safetensors weights for the {kind} "
                             f"(looked in {', '.join(s + '/' for s in subfolders) or ''} and the folder itself).")
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelFileError(f"{flag}: {p} is a pickle checkpoint; only .safetensors/.sft files are supported. "
                             "Convert it to safetensors first.")
    return [p]


def _read_header(files: list[Path], flag: str, kind: str) -> dict[str, tuple[tuple, str]]:
    from safetensors import safe_open

    out: dict[str, tuple[tuple, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
        except Exception as e:  # safetensors raises several types for truncated/garbage files
            raise ModelFileError(f"{flag}: cannot read {kind} file {f}: {e}. The file is not a safetensors "
                                 "file or is incomplete (re-download it).") from e
    if not out:
        raise ModelFileError(f"{flag}: {kind} file {files[0]} contains no tensors.")
    return out


def _stream_file(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one safetensors file read with plain reads, one at a time: unlike the memory map,
    pages read here are not charged to this process, so converting a 24 GB file needs ~1 tensor extra."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
            buf = bytearray(end - begin)
            fh.seek(8 + n + begin)
            if fh.readinto(buf) != len(buf):
                raise OSError(f"{f}: file ends inside tensor {key!r} (truncated download?)")
            flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            yield key, flat.view(dtype).reshape(info["shape"])


def _iter_tensors(files: list[Path], stream: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of `files`. Memory-mapped (zero copy) unless `stream`, which suits loads that cast
    every tensor anyway (fp8, fp16 file -> bf16) or filesystems where mmap misbehaves."""
    from safetensors import safe_open

    for f in files:
        if stream:
            yield from _stream_file(f)
            continue
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                yield k, sf.get_tensor(k)


def _needs_cast(header: dict[str, tuple[tuple, str]], dtype) -> bool:
    return any(d != str(dtype).removeprefix("torch.") for _, d in header.values())


def _meta_shapes_convert(shapes: dict[str, tuple], fn: Callable[[dict], dict]) -> dict[str, tuple]:
    """Run a whole-dict key converter on meta tensors to learn the converted shapes cheaply."""
    metas = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in fn(metas).items()}


def _wrong_kind(flag: str, kind: str, path, err: Exception) -> ModelFileError:
    return ModelFileError(f"{flag}: {path} does not look like a {kind} ({err}). Is the right file passed to {flag}?")


def _assign_state(model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], flag: str, path,
                  kind: str, *, optional_missing: tuple[str, ...] = ()) -> list[str]:
    """Cast each tensor to the dtype the (meta) model wants and assign; returns missing optional keys."""
    targets = {k: v.dtype for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    for k, t in tensors:
        if k not in targets:
            raise ModelFileError(f"{flag}: {path}: unexpected tensor {k!r} for a {kind}. Is this the right file?")
        sd[k] = t.to(targets[k]).contiguous()
    missing = [k for k in targets if k not in sd and k not in optional_missing]
    if missing:
        raise ModelFileError(f"{flag}: {path}: {kind} is missing {len(missing)} tensors (e.g. {missing[:3]}). "
                             "The file is incomplete or a different model variant.")
    model.load_state_dict(sd, strict=False, assign=True)
    return [k for k in optional_missing if k not in sd]


# ---------------------------------------------------------------- FLUX transformer

def _flux_bfl_shapes(header: dict[str, tuple[tuple, str]]) -> tuple[dict[str, tuple], bool, dict[str, str]]:
    keys = list(header)
    if fc.is_diffusers_flux_keys(keys):
        shapes = _meta_shapes_convert({k: v[0] for k, v in header.items()}, fc.diffusers_to_bfl)
        return shapes, True, {k: k for k in keys}
    keymap, _ = fc.strip_bfl_prefix(keys)
    return {k: header[orig][0] for k, orig in keymap.items()}, False, keymap


def analyze_flux_checkpoint(path, *, flag: str = FLUX_FLAG) -> FluxModelInfo:
    """Architecture of a FLUX transformer file/folder from its header(s) only."""
    files = weight_files(path, flag, "FLUX transformer", ("transformer",))
    header = _read_header(files, flag, "FLUX transformer")
    try:
        shapes, is_diffusers, keymap = _flux_bfl_shapes(header)
        cfg = fc.infer_flux_config(shapes)
    except fc.ConversionError as e:
        raise _wrong_kind(flag, "FLUX transformer", path, e) from e
    probe = next((k for k in ("double_blocks.0.img_attn.qkv.weight", "img_in.weight") if k in keymap), None)
    probe_key = keymap[probe] if probe else "transformer_blocks.0.attn.to_q.weight"
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return FluxModelInfo(
        path=str(path), is_diffusers=is_diffusers, is_schnell=not cfg["guidance_embeds"], hidden_size=hidden,
        num_heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"], depth=cfg["num_layers"],
        depth_single=cfg["num_single_layers"], in_channels=cfg["in_channels"], context_dim=cfg["joint_attention_dim"],
        vec_dim=cfg["pooled_projection_dim"], axes_dims_rope=tuple(cfg["axes_dims_rope"]),
        guidance_embeds=cfg["guidance_embeds"], dtype_name=header.get(probe_key, ((), "unknown"))[1],
        config=cfg, files=tuple(str(f) for f in files))


def load_flow_model(path, *, dtype, device="cpu", fp8: bool = False, disable_mmap: bool = False,
                    flag: str = FLUX_FLAG):
    """FluxTransformer2DModel in eval mode, frozen. With fp8=True the Linear weights are stored as
    float8_e4m3fn and upcast to `dtype` per layer at forward time (diffusers layerwise casting)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    info = analyze_flux_checkpoint(path, flag=flag)
    logger.info("loading FLUX transformer %s (%d double / %d single blocks, hidden %d, %s%s)", path, info.depth,
                info.depth_single, info.hidden_size, info.dtype_name, ", fp8 storage" if fp8 else "")
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(info.config)
    torch.nn.Module.to(model, dtype)  # plain cast of the meta model; ModelMixin.to only adds a warning here
    if fp8:
        # On the meta model this only records dtypes, so real tensors are cast once, one at a time.
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                       skip_modules_pattern=FP8_SKIP_PATTERNS)
    files = [Path(f) for f in info.files]
    dtype_name = str(dtype).removeprefix("torch.")
    keymap, _ = fc.strip_bfl_prefix(_read_header(files, flag, "FLUX transformer"))
    inverse = {orig: k for k, orig in keymap.items()}

    def converted():
        for key, t in _iter_tensors(files, stream=fp8 or disable_mmap or info.dtype_name != dtype_name):
            if info.is_diffusers:
                yield key, t
            elif key in inverse:  # other components of an all-in-one file are skipped
                yield from fc.bfl_tensor_to_diffusers(inverse[key], t, info.hidden_size)

    try:
        _assign_state(model, converted(), flag, path, "FLUX transformer")
    except fc.ConversionError as e:
        raise _wrong_kind(flag, "FLUX transformer", path, e) from e
    model.to(device)
    model.eval().requires_grad_(False)
    # Training and sampling both go through here: t*1000 and guidance*1000 in float32, as upstream.
    return keep_time_inputs_float32(model)


# ---------------------------------------------------------------- autoencoder

_AE_PREFIXES = ("first_stage_model.", "vae.")


def _ae_keymap(keys: list[str]) -> dict[str, str]:
    for prefix in _AE_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in keys):
            return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    return {k: k for k in keys}


def load_ae(path, *, dtype, flag: str = "--ae"):
    """diffusers AutoencoderKL from a BFL/LDM `ae.sft` or a diffusers vae folder."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    files = weight_files(path, flag, "autoencoder", ("vae",))
    header = _read_header(files, flag, "autoencoder")
    keymap = _ae_keymap(list(header))
    shapes = {k: header[o][0] for k, o in keymap.items()}
    is_diffusers = any(k.startswith("encoder.down_blocks.") for k in shapes)
    try:
        ldm_shapes = _meta_shapes_convert(shapes, fc.ae_diffusers_to_ldm) if is_diffusers else shapes
        config = fc.infer_ae_config(ldm_shapes)
    except (fc.ConversionError, KeyError, ValueError) as e:
        raise _wrong_kind(flag, "FLUX autoencoder", path, e) from e
    with init_empty_weights():
        ae = AutoencoderKL.from_config(config)
    torch.nn.Module.to(ae, dtype)
    inverse = {o: k for k, o in keymap.items()}

    def converted():
        for key, t in _iter_tensors(files, stream=_needs_cast(header, dtype)):
            if key not in inverse:
                continue
            k = inverse[key]
            if is_diffusers:
                yield k, t
            else:
                yield from fc.ae_ldm_to_diffusers({k: t}, num_up=len(config["up_block_types"])).items()

    try:
        _assign_state(ae, converted(), flag, path, "FLUX autoencoder")
    except fc.ConversionError as e:
        raise _wrong_kind(flag, "FLUX autoencoder", path, e) from e
    return ae.eval().requires_grad_(False)


def encode_latents(ae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> scaled FLUX latents (posterior sample, then (z - shift) * scale)."""
    x = images.to(device=ae.device, dtype=ae.dtype)
    dist = ae.encode(x).latent_dist
    z = dist.sample(generator=generator)
    cfg = ae.config
    return (z - cfg.shift_factor) * cfg.scaling_factor


# ---------------------------------------------------------------- text encoders

_CLIP_DROP = ("text_projection.", "logit_scale", "visual.")


def _clip_keymap(keys: list[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        if k.startswith(_CLIP_DROP):
            continue
        new = k[len("text_model."):] if k.startswith("text_model.") else k
        out[new] = k
    return out


def _count(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def clip_config_from_shapes(shapes: dict[str, tuple]) -> dict:
    """CLIPTextConfig kwargs; heads = hidden // 64 (CLIP-L: 768 -> 12), at least 1."""
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(shapes, "encoder.layers."),
                num_attention_heads=max(1, hidden // 64),
                intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
                hidden_act="quick_gelu", projection_dim=hidden,
                bos_token_id=min(49406, vocab - 2), eos_token_id=min(49407, vocab - 1), pad_token_id=1)


def load_clip_l(path, *, dtype, flag: str = "--clip_l"):
    """transformers CLIPTextModel from a `clip_l.safetensors`-style file (with or without `text_model.`)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    files = weight_files(path, flag, "CLIP-L text encoder", ("text_encoder",))
    header = _read_header(files, flag, "CLIP-L text encoder")
    keymap = _clip_keymap(list(header))
    try:
        cfg = CLIPTextConfig(**clip_config_from_shapes({k: header[o][0] for k, o in keymap.items()}))
    except (KeyError, ValueError) as e:
        raise _wrong_kind(flag, "CLIP-L text encoder", path, e) from e
    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(cfg)
    model.to(dtype)
    inverse = {o: k for k, o in keymap.items()}
    stream = _needs_cast(header, dtype)
    tensors = ((inverse[k], t) for k, t in _iter_tensors(files, stream=stream) if k in inverse)
    _assign_state(model, tensors, flag, path, "CLIP-L text encoder")
    return model.eval().requires_grad_(False)


def t5_config_from_shapes(shapes: dict[str, tuple]) -> dict:
    """T5Config kwargs; heads from relative_attention_bias [buckets, heads]; gated-gelu when wi_0 exists."""
    vocab, d_model = shapes["shared.weight"] if "shared.weight" in shapes else shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    return dict(vocab_size=vocab, d_model=d_model, num_layers=_count(shapes, "encoder.block."), num_heads=heads,
                d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                d_ff=shapes[ff_key][0], relative_attention_num_buckets=buckets,
                feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False)


def load_t5xxl(path, *, dtype, flag: str = "--t5xxl"):
    """transformers T5EncoderModel from a `t5xxl_fp16.safetensors`-style file."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    files = weight_files(path, flag, "T5-XXL text encoder", ("text_encoder_2",))
    header = _read_header(files, flag, "T5-XXL text encoder")
    shapes = {k: v[0] for k, v in header.items()}
    try:
        cfg = T5Config(**t5_config_from_shapes(shapes))
    except (KeyError, ValueError) as e:
        raise _wrong_kind(flag, "T5-XXL text encoder", path, e) from e
    with init_empty_weights(include_buffers=False):
        model = T5EncoderModel(cfg)
    model.to(dtype)

    def tensors():
        for k, t in _iter_tensors(files, stream=_needs_cast(header, dtype)):
            if k == "encoder.embed_tokens.weight" and "shared.weight" not in header:
                k = "shared.weight"  # some exports keep only the encoder copy of the tied embedding
            if k != "encoder.embed_tokens.weight":
                yield k, t

    _assign_state(model, tensors(), flag, path, "T5-XXL text encoder", optional_missing=("encoder.embed_tokens.weight",))
    model.tie_weights()
    return model.eval().requires_grad_(False)
