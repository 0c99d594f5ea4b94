"""Helpers for the fluxgym tests: small image folders, fake model files, a stand-in trainer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image

from fluxgym.generate import GenerateOptions, generate
from fluxgym.models import resolve_base_model
from fluxgym.naming import project_paths
from fluxgym.prepare import prepare_dataset

HERE = Path(__file__).resolve().parent
STAND_IN = HERE / "stand_in_trainer.py"


def make_images(folder: Path, n: int = 3, size=(96, 80), captions: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i % 255, 100, 200)).save(folder / f"img{i}.png")
    for stem, text in (captions or {}).items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def fake_models(root: Path, key: str = "demo") -> None:
    """Empty placeholder files where `key`'s weights belong (the stand-in trainer never reads them)."""
    files = resolve_base_model(root, key)
    for name, path in files.files().items():
        if name == "tokenizer_cache_dir":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"placeholder")


def setup_lora(root: Path, name: str = "My LoRA", *, trigger: str = "tok", models: bool = True, **gen_kw):
    """prepare + generate against the stand-in trainer; returns (ProjectPaths, GenerateResult)."""
    paths = project_paths(root, name)
    src = make_images(root.parent / f"src-{paths.slug}", 3)
    prepare_dataset(src, paths.dataset_dir, trigger=trigger, resolution=64)
    if models:
        fake_models(root, gen_kw.get("base_model", "demo"))
    opts = dict(vram="cpu", base_model="demo", trigger=trigger, trainer_script=STAND_IN, launcher="python")
    opts.update(gen_kw)
    res = generate(GenerateOptions(name=name, root=root, **opts))
    return res.paths, res


def stand_in_env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ)
    env["FLUXGYM_PYTHON"] = sys.executable
    env["FG_RECORD"] = str(tmp_path / "record.json")
    env.update({k: str(v) for k, v in extra.items()})
    return env
