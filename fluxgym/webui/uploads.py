"""Uploaded images -> a private staging folder with safe names, ready for `fluxgym.prepare`.

A browser sends whatever file name it likes: only the last path component survives, reduced to
`A-Za-z0-9._-` (so `../../x` or `C:\\x` cannot leave the staging folder), and clashes get a suffix.
Only image types are accepted, each at most `MAX_UPLOAD_BYTES` and readable by PIL; the staging folder
is new for every submission, so one LoRA's upload never lands in another's dataset.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import unicodedata
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fluxgym.prepare import IMAGE_EXTS, MAX_IMAGES
from fluxgym.webui.form import FieldError

MAX_UPLOAD_BYTES = 40 * 1024 * 1024  # a 40 MB image is already far beyond any training resolution
STAGING = "outputs/.fluxgym/uploads"


def safe_name(name: str) -> str:
    """The last path component of `name`, reduced to safe characters; never empty, never hidden."""
    base = re.split(r"[\\/]", name)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = stem[:80] or "image"
    return f"{stem}.{ext.lower()}" if ext else stem


def stage_uploads(root: Path, files: list[tuple[str, Path]], captions: dict[str, str] | None = None) -> Path:
    """Copy (original name, temp path) uploads into a new staging folder; returns it.

    `captions` maps an original name to its caption; each non-empty one is written next to its image.
    """
    if not files:
        raise FieldError("images", "no images uploaded: add at least 2 images (4-30 recommended)")
    if len(files) > MAX_IMAGES:
        raise FieldError("images", f"{len(files)} images uploaded; at most {MAX_IMAGES} are supported")
    problems = []
    for original, path in files:
        ext = Path(safe_name(original)).suffix.lower()
        if ext not in IMAGE_EXTS:
            problems.append(f"{original!r}: not an image type ({', '.join(IMAGE_EXTS)} accepted)")
            continue
        size = Path(path).stat().st_size
        if size > MAX_UPLOAD_BYTES:
            problems.append(f"{original!r}: {size / 2**20:.0f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB limit")
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            problems.append(f"{original!r}: cannot be read as an image ({exc})")
    if problems:
        raise FieldError("images", "refused uploads: " + "; ".join(problems))
    base = Path(root) / STAGING
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=base))
    used: set[str] = set()
    for original, path in files:
        name = safe_name(original)
        stem, ext = Path(name).stem, Path(name).suffix
        n = 1
        while name.lower() in used or f"{Path(name).stem.lower()}.txt" in used:
            n += 1
            name = f"{stem}_{n}{ext}"
        used.add(name.lower())
        used.add(f"{Path(name).stem.lower()}.txt")
        target = folder / name
        shutil.copyfile(path, target)
        caption = (captions or {}).get(original, "")
        if caption.strip():
            target.with_suffix(".txt").write_text(caption.strip(), encoding="utf-8")
    return folder
