"""The embedded demo: tiny models, a drawn dataset and `outputs/demo/train.sh`, all offline.

`build_demo(root)` builds the tiny FLUX-architecture weights (fluxgym.tiny_flux, imported lazily:
it needs torch), draws seeded shape images with captions, prepares them into `datasets/demo` with the
same code as `prepare`, and generates the scripts with the `cpu` preset. Safe to re-run.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from fluxgym.generate import GenerateOptions, generate
from fluxgym.models import missing_files, resolve_base_model
from fluxgym.naming import project_paths
from fluxgym.prepare import prepare_dataset

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
TRIGGER = "fgdemo"
RESOLUTION = 64
N_IMAGES = 8
# Small on purpose: 8 images x 2 repeats x 4 epochs = 64 steps of a tiny model, well under 2 min on CPU.
DEMO_SETTINGS = {"epochs": 4, "save_every": 2, "repeats": 2, "lr": "1e-3", "rank": 4, "seed": 42, "workers": 0}

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "white": (245, 245, 245), "black": (15, 15, 15), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_image(rng: random.Random, size: int = 128) -> tuple[Image.Image, str]:
    """One seeded picture of a coloured shape on a plain background, and its caption."""
    bg_name, fg_name = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    im = Image.new("RGB", (size, size), COLOURS[bg_name])
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg_name])
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg_name])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg_name])
    return im, f"{TRIGGER}, a {fg_name} {shape} on a {bg_name} background"


def write_demo_images(folder: Path, *, n: int = N_IMAGES, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        im, caption = draw_image(rng)
        path = folder / f"shape_{i:02d}.png"
        im.save(path)
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        out.append(path)
    return out


def ensure_tiny_models(root: Path, *, force: bool = False) -> None:
    files = resolve_base_model(root, "demo")
    if not force and not missing_files(files):
        log.info("tiny demo models already present in %s", root / "models")
        return
    from fluxgym.tiny_flux import build_tiny_models  # lazy: needs torch

    built = build_tiny_models(root / "models")
    log.info("built tiny demo models: %s", ", ".join(str(p) for p in built.values()))
    still = missing_files(files)
    if still:
        raise RuntimeError("tiny model builder did not write: " + ", ".join(map(str, still)))


def build_demo(root: Path, *, force: bool = False, models: bool = True, **overrides) -> Path:
    """Everything the demo needs under `root`; returns outputs/demo/train.sh."""
    root = Path(root).resolve()
    if models:
        ensure_tiny_models(root, force=force)
    paths = project_paths(root, DEMO_NAME)
    with tempfile.TemporaryDirectory(prefix="fluxgym-demo-") as tmp:
        write_demo_images(Path(tmp))
        prepare_dataset(Path(tmp), paths.dataset_dir, trigger=TRIGGER, resolution=RESOLUTION)
    settings = {**DEMO_SETTINGS, **overrides}
    res = generate(GenerateOptions(name=DEMO_NAME, vram="cpu", root=root, trigger=TRIGGER, base_model="demo",
                                   resolution=RESOLUTION, **settings))
    return res.files["train.sh"]
