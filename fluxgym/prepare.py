"""Dataset preparation: a folder of images -> `datasets/<slug>/` as FluxGym lays it out.

Each image is checked, copied and resized so its shorter side equals the resolution (PIL, LANCZOS);
an existing `<image>.txt` caption (next to the source, or already in the dataset) is kept, otherwise
the trigger becomes the caption. Every problem is reported before anything is written.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fluxgym.naming import check_one_line

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGES = 2  # FluxGym's own lower limit
MAX_IMAGES = 150


class DatasetError(ValueError):
    """A missing/empty image folder, too few images, or files that are not readable images."""


@dataclass(frozen=True)
class PreparedImage:
    image: Path
    caption: Path
    caption_kept: bool  # True when an existing caption was kept


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (sorted; hidden files ignored)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def check_image_folder(folder: Path) -> list[Path]:
    """All images of a source folder, or one error naming every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    images = list_images(folder)
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() not in IMAGE_EXTS and p.suffix.lower() != ".txt")
    problems = [f"  - {name}: not an image (supported: {', '.join(IMAGE_EXTS)}); remove it" for name in others]
    for path in images:
        try:
            with Image.open(path) as im:
                im.verify()  # reads the whole structure; catches truncated files early
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            problems.append(f"  - {path.name}: cannot be read as an image ({exc})")
    if problems:
        raise DatasetError(f"problems in {folder}:\n" + "\n".join(problems))
    if len(images) < MIN_IMAGES:
        raise DatasetError(f"{folder} has {len(images)} image(s); at least {MIN_IMAGES} are needed (4-30 recommended)")
    if len(images) > MAX_IMAGES:
        raise DatasetError(f"{folder} has {len(images)} images; at most {MAX_IMAGES} are supported")
    return images


def resize_shorter_side(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im if size == im.size else im.resize(size, Image.LANCZOS)


def _save_image(src: Path, dst: Path, resolution: int) -> None:
    with Image.open(src) as im:
        im.load()
        out = resize_shorter_side(im, resolution)
        if dst.suffix.lower() in (".jpg", ".jpeg") and out.mode not in ("RGB", "L"):
            out = out.convert("RGB")  # JPEG has no alpha
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        out.save(tmp, format=im.format or None)
    os.replace(tmp, dst)


def prepare_dataset(src: Path, dest: Path, *, trigger: str, resolution: int = 512) -> list[PreparedImage]:
    """Copy and resize every image of `src` into `dest`, with one caption file each."""
    check_one_line(trigger, "--trigger")
    if resolution <= 0:
        raise DatasetError(f"--resolution must be positive, got {resolution}")
    images = check_image_folder(src)
    names = [p.name.lower() for p in images]
    clashes = sorted({n for n in names if names.count(n) > 1})
    stems = [p.stem for p in images]
    clashes += sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise DatasetError(f"{src}: images would share a caption file: {', '.join(clashes)}; rename them")
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for path in images:
        target = dest / path.name
        _save_image(path, target, resolution)
        caption = target.with_suffix(".txt")
        source_caption = path.with_suffix(".txt")
        if source_caption.is_file() and source_caption.resolve() != caption.resolve():
            shutil.copyfile(source_caption, caption)
            kept = True
        elif caption.is_file():
            kept = True  # a caption already in the dataset wins over the trigger, as in FluxGym
        else:
            caption.write_text(trigger, encoding="utf-8")
            kept = False
        done.append(PreparedImage(target, caption, kept))
    if not trigger and not all(p.caption_kept for p in done):
        log.warning("no --trigger given: images without a caption got an empty caption file")
    return done
