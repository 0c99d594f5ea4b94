"""`python -m fluxgym demo`: tiny models, a drawn dataset and outputs/demo scripts; re-running changes nothing."""

from __future__ import annotations

import tomllib

from PIL import Image

from fluxgym.cli import main
from fluxgym.demo import N_IMAGES, RESOLUTION, TRIGGER


def _snapshot(root):
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "models" not in p.parts and p.suffix != ".json"}


def test_demo_builds_everything_offline_and_idempotently(root):
    assert main(["demo", "--root", str(root)]) == 0
    models = root / "models"
    for rel in ("unet/flux-demo.safetensors", "clip/demo_clip_l.safetensors", "clip/demo_t5xxl_fp16.safetensors",
                "vae/demo_ae.sft", "tokenizers/demo"):
        assert (models / rel).exists(), rel
    ds = root / "datasets" / "demo"
    images = sorted(ds.glob("*.png"))
    assert len(images) >= N_IMAGES
    for img in images:
        with Image.open(img) as im:
            assert min(im.size) == RESOLUTION
        assert img.with_suffix(".txt").read_text().startswith(TRIGGER)
    out = root / "outputs" / "demo"
    sh = (out / "train.sh").read_text()
    assert "Preset: cpu v1" in sh and "--mixed_precision no" in sh and "--save_state" in sh
    assert f"--tokenizer_cache_dir {models / 'tokenizers' / 'demo'}" in sh
    cfg = tomllib.loads((out / "dataset.toml").read_text())
    assert cfg["datasets"][0]["resolution"] == RESOLUTION
    assert cfg["datasets"][0]["subsets"][0]["class_tokens"] == TRIGGER
    assert (out / "train.bat").is_file() and (out / "sample_prompts.txt").is_file()
    before = {k: v[0] for k, v in _snapshot(root).items()}
    model_mtimes = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}
    assert main(["demo", "--root", str(root)]) == 0
    assert {k: v[0] for k, v in _snapshot(root).items()} == before
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()} == model_mtimes
