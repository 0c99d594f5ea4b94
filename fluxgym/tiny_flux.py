"""Build tiny, seeded FLUX-architecture model files for the demo and the tests.

Writes the same file layouts real users have: a BFL single-file DiT (bf16), a `clip_l.safetensors`-style
CLIP-L, a `t5xxl_fp16.safetensors`-style T5 encoder, an LDM/BFL `ae.sft` autoencoder, the real CLIP BPE
tokenizer and a tiny sentencepiece T5 tokenizer. Tensors are generated and streamed to disk one at a
time (so width="real", ~545M params, needs little RAM); same seed -> byte-identical files; files that
already hold the requested build are left alone. torch/transformers are imported lazily.
"""
from __future__ import annotations

import io
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

TINY = {"hidden": 64, "heads": 2, "depth": 2, "depth_single": 2, "in_ch": 64, "guidance": True,
        "clip_hidden": 64, "clip_layers": 2, "clip_inter": 128,
        "t5_d": 64, "t5_heads": 2, "t5_kv": 32, "t5_ff": 128, "t5_layers": 2}
# Real FLUX width and embedder sizes with one block of each kind; encoders stay small except where
# their width is fixed by the transformer (T5 d_model = 4096 context, CLIP hidden = 768 vector).
REAL = {"hidden": 3072, "heads": 24, "depth": 1, "depth_single": 1, "in_ch": 64, "guidance": True,
        "clip_hidden": 768, "clip_layers": 1, "clip_inter": 3072,
        "t5_d": 4096, "t5_heads": 2, "t5_kv": 32, "t5_ff": 64, "t5_layers": 1}
WIDTHS = {"tiny": TINY, "real": REAL}
AE_CHANNELS = (8, 16, 16, 16)  # 4 levels -> 8x downsampling, like the real AE's (128, 256, 512, 512)
AE_LATENT = 16
CLIP_VOCAB, CLIP_POSITIONS = 49408, 77
T5_VOCAB, T5_PIECES, T5_BUCKETS = 256, 150, 32

FILES = {"unet": "unet/flux-demo.safetensors", "clip_l": "clip/demo_clip_l.safetensors",
         "t5xxl": "clip/demo_t5xxl_fp16.safetensors", "ae": "vae/demo_ae.sft"}
TOKENIZER_DIR = "tokenizers/demo"

_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


# ---------------------------------------------------------------- tensor specs: (key, shape, init)
# init: "w" fan-in scaled normal, "zero", "one", or a float = normal std.

def _linear(name, out_f, in_f, bias=True):
    spec = [(f"{name}.weight", (out_f, in_f), "w")]
    return spec + ([(f"{name}.bias", (out_f,), "zero")] if bias else [])


def dit_spec(c: dict) -> list:
    h, hd, cin = c["hidden"], c["hidden"] // c["heads"], c["in_ch"]
    s = _linear("img_in", h, cin) + _linear("time_in.in_layer", h, 256) + _linear("time_in.out_layer", h, h)
    s += _linear("vector_in.in_layer", h, c["clip_hidden"]) + _linear("vector_in.out_layer", h, h)
    if c["guidance"]:
        s += _linear("guidance_in.in_layer", h, 256) + _linear("guidance_in.out_layer", h, h)
    s += _linear("txt_in", h, c["t5_d"])
    for i in range(c["depth"]):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}"
            s += _linear(f"{b}_mod.lin", 6 * h, h) + _linear(f"{b}_attn.qkv", 3 * h, h)
            s += [(f"{b}_attn.norm.query_norm.scale", (hd,), "one"), (f"{b}_attn.norm.key_norm.scale", (hd,), "one")]
            s += _linear(f"{b}_attn.proj", h, h) + _linear(f"{b}_mlp.0", 4 * h, h) + _linear(f"{b}_mlp.2", h, 4 * h)
    for i in range(c["depth_single"]):
        b = f"single_blocks.{i}"
        s += _linear(f"{b}.linear1", 7 * h, h) + _linear(f"{b}.linear2", h, 5 * h)
        s += [(f"{b}.norm.query_norm.scale", (hd,), "one"), (f"{b}.norm.key_norm.scale", (hd,), "one")]
        s += _linear(f"{b}.modulation.lin", 3 * h, h)
    return s + _linear("final_layer.linear", cin, h) + _linear("final_layer.adaLN_modulation.1", 2 * h, h)


def _norm(name, ch):
    return [(f"{name}.weight", (ch,), "one"), (f"{name}.bias", (ch,), "zero")]


def _conv(name, out_c, in_c, k=3):
    return [(f"{name}.weight", (out_c, in_c, k, k), "w"), (f"{name}.bias", (out_c,), "zero")]


def _resnet(name, in_c, out_c):
    s = _norm(f"{name}.norm1", in_c) + _conv(f"{name}.conv1", out_c, in_c)
    s += _norm(f"{name}.norm2", out_c) + _conv(f"{name}.conv2", out_c, out_c)
    return s + (_conv(f"{name}.nin_shortcut", out_c, in_c, 1) if in_c != out_c else [])


def _mid(side, ch):
    s = _resnet(f"{side}.mid.block_1", ch, ch) + _norm(f"{side}.mid.attn_1.norm", ch)
    for proj in ("q", "k", "v", "proj_out"):
        s += _conv(f"{side}.mid.attn_1.{proj}", ch, ch, 1)
    return s + _resnet(f"{side}.mid.block_2", ch, ch)


def ae_spec(channels=AE_CHANNELS, layers: int = 1, z: int = AE_LATENT) -> list:
    n, last = len(channels), channels[-1]
    s = _conv("encoder.conv_in", channels[0], 3)
    prev = channels[0]
    for i, ch in enumerate(channels):
        for j in range(layers):
            s += _resnet(f"encoder.down.{i}.block.{j}", prev if j == 0 else ch, ch)
        prev = ch
        if i < n - 1:
            s += _conv(f"encoder.down.{i}.downsample.conv", ch, ch)
    s += _mid("encoder", last) + _norm("encoder.norm_out", last) + _conv("encoder.conv_out", 2 * z, last)
    s += _conv("decoder.conv_in", last, z) + _mid("decoder", last)
    prev = last
    for i in reversed(range(n)):
        for j in range(layers + 1):
            s += _resnet(f"decoder.up.{i}.block.{j}", prev, channels[i])
            prev = channels[i]
        if i != 0:
            s += _conv(f"decoder.up.{i}.upsample.conv", channels[i], channels[i])
    return s + _norm("decoder.norm_out", channels[0]) + _conv("decoder.conv_out", 3, channels[0])


def clip_spec(c: dict) -> list:
    h, p = c["clip_hidden"], "text_model"
    s = [(f"{p}.embeddings.token_embedding.weight", (CLIP_VOCAB, h), 0.02),
         (f"{p}.embeddings.position_embedding.weight", (CLIP_POSITIONS, h), 0.01)]
    for i in range(c["clip_layers"]):
        b = f"{p}.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s += _linear(f"{b}.self_attn.{proj}", h, h)
        s += _norm(f"{b}.layer_norm1", h) + _linear(f"{b}.mlp.fc1", c["clip_inter"], h)
        s += _linear(f"{b}.mlp.fc2", h, c["clip_inter"]) + _norm(f"{b}.layer_norm2", h)
    # clip_l.safetensors as distributed also carries the projection; the loader must skip it.
    return s + _norm(f"{p}.final_layer_norm", h) + [("text_projection.weight", (h, h), "w")]


def t5_spec(c: dict) -> list:
    d, inner, ff = c["t5_d"], c["t5_heads"] * c["t5_kv"], c["t5_ff"]
    s = [("shared.weight", (T5_VOCAB, d), 0.5)]
    for i in range(c["t5_layers"]):
        b = f"encoder.block.{i}.layer"
        for proj in ("q", "k", "v"):
            s += _linear(f"{b}.0.SelfAttention.{proj}", inner, d, bias=False)
        s += _linear(f"{b}.0.SelfAttention.o", d, inner, bias=False)
        if i == 0:
            s += [(f"{b}.0.SelfAttention.relative_attention_bias.weight", (T5_BUCKETS, c["t5_heads"]), 0.1)]
        s += [(f"{b}.0.layer_norm.weight", (d,), "one")]
        s += _linear(f"{b}.1.DenseReluDense.wi_0", ff, d, bias=False)
        s += _linear(f"{b}.1.DenseReluDense.wi_1", ff, d, bias=False)
        s += _linear(f"{b}.1.DenseReluDense.wo", d, ff, bias=False) + [(f"{b}.1.layer_norm.weight", (d,), "one")]
    return s + [("encoder.final_layer_norm.weight", (d,), "one")]


# ---------------------------------------------------------------- streaming safetensors writer

def _header_bytes(spec: list, dtype_name: str, metadata: dict) -> bytes:
    import math

    item = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype_name]
    header, offset = {}, 0
    for key, shape, _ in spec:
        size = math.prod(shape) * item
        header[key] = {"dtype": _ST_DTYPE[dtype_name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _expected_size(spec: list, dtype_name: str, metadata: dict) -> int:
    import math

    item = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype_name]
    return len(_header_bytes(spec, dtype_name, metadata)) + sum(math.prod(s) for _, s, _ in spec) * item


def _is_current(path: Path, spec: list, dtype_name: str, metadata: dict) -> bool:
    """Same size and same header => same build (data is a pure function of seed and spec)."""
    if not path.is_file() or path.stat().st_size != _expected_size(spec, dtype_name, metadata):
        return False
    want = _header_bytes(spec, dtype_name, metadata)
    with open(path, "rb") as f:
        return f.read(len(want)) == want


def _write_safetensors(path: Path, spec: list, dtype_name: str, seed: int, metadata: dict) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_header_bytes(spec, dtype_name, metadata))
        for _, shape, init in spec:
            if init == "zero":
                t = torch.zeros(shape)
            elif init == "one":
                t = torch.ones(shape)
            else:
                fan_in = 1
                for dim in shape[1:]:
                    fan_in *= dim
                std = fan_in ** -0.5 if init == "w" else float(init)
                t = torch.randn(shape, generator=gen) * std
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
            del t
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- tokenizers

_WORDS = ("a photo of painting portrait closeup the an with and in on at style cat dog woman man girl boy "
          "red blue green yellow black white golden dark bright tiny large old young smiling sitting standing "
          "forest city beach mountain river street room garden night sunset morning light shadow detailed "
          "illustration watercolor oil sketch anime cinematic lighting background wearing hat dress shirt "
          "glasses holding looking viewer trigger demo subject character sks ohwx").split()


def _spm_sentences() -> list[str]:
    """Deterministic caption-like text covering every word several times."""
    n = len(_WORDS)
    return [" ".join(_WORDS[(i * k + j) % n] for j in range(8)) for i in range(n) for k in (1, 3, 7)]


def _save_t5_tokenizer(target: Path) -> None:
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_spm_sentences()), model_writer=buf,
                                   vocab_size=T5_PIECES, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(buf.getvalue())
        tok = T5TokenizerFast.from_pretrained(tmp, local_files_only=True)
    if len(tok) > T5_VOCAB:
        raise RuntimeError(f"tiny T5 tokenizer has {len(tok)} tokens, more than the model's {T5_VOCAB}")
    tok.model_max_length = 512
    tok.save_pretrained(str(target))


def _save_clip_tokenizer(target: Path) -> None:
    from fluxgym._paths import use_sd_scripts

    use_sd_scripts()  # library.* imports are absolute from sd-scripts/, as in the trainer
    from library.flux_tokenizers import build_clip_tokenizer_from_bpe

    tok = build_clip_tokenizer_from_bpe()
    if tok is None:
        raise RuntimeError("open_clip_torch is not installed; it provides the CLIP BPE vocabulary "
                           "(pip install --no-deps open_clip_torch)")
    tok.save_pretrained(str(target))


def _build_tokenizers(root: Path) -> None:
    for name, saver in (("openai_clip-vit-large-patch14", _save_clip_tokenizer),
                        ("google_t5-v1_1-xxl", _save_t5_tokenizer)):
        target = root / name
        if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
            continue
        tmp = root / f".{name}.tmp-{os.getpid()}"
        saver(tmp)
        if target.exists():  # a partial earlier build
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)


# ---------------------------------------------------------------- entry point

def build_tiny_models(models_dir, *, seed: int = 0, width: str = "tiny") -> dict[str, Path]:
    """Write (or keep, if already current) the demo model files under models_dir; returns their paths."""
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {sorted(WIDTHS)}, not {width!r}")
    cfg, root = WIDTHS[width], Path(models_dir)
    parts = {"unet": (dit_spec(cfg), "bfloat16"), "clip_l": (clip_spec(cfg), "float16"),
             "t5xxl": (t5_spec(cfg), "float16"), "ae": (ae_spec(), "float32")}
    out: dict[str, Path] = {}
    for i, (name, (spec, dtype_name)) in enumerate(parts.items()):
        path = root / FILES[name]
        meta = {"fluxtrain_tiny": f"{name} width={width} seed={seed}"}
        if not _is_current(path, spec, dtype_name, meta):
            _write_safetensors(path, spec, dtype_name, seed * 1000 + i, meta)
        out[name] = path
    tok_root = root / TOKENIZER_DIR
    tok_root.mkdir(parents=True, exist_ok=True)
    _build_tokenizers(tok_root)
    out["tokenizer_cache_dir"] = tok_root
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build tiny FLUX-architecture demo model files.")
    ap.add_argument("models_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", choices=sorted(WIDTHS), default="tiny")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    paths = build_tiny_models(args.models_dir, seed=args.seed, width=args.width)
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    else:
        for k, v in paths.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
