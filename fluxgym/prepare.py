"""Dataset preparation: a folder of images -> `datasets/<slug>/` as FluxGym lays it out, matching that folder.

Each image is checked, copied and resized so its shorter side equals the resolution (PIL, LANCZOS);
an existing `<image>.txt` caption (next to the source, or already in the dataset) is kept, otherwise
the trigger becomes the caption. `plan_dataset` checks everything and writes nothing; `apply_plan` writes.
Files in the dataset that the image folder no longer has (an earlier prepare's images and captions, a caption
the source would overwrite) are removed only with `replace=True`; without it the plan is refused, listing them.
Every copy and caption is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fluxgym.atomic_files import atomic_path, stale_temp_files, write_text_atomic
from fluxgym.naming import check_one_line

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXT = ".txt"
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark
# The trainer's disk caches next to each image (sd-scripts names): derived data, removed with their image.
_CACHE_RE = re.compile(r"^(?P<stem>.+)(_\d+x\d+_flux|_flux_te)\.npz$")
# Litter that operating systems and photo tools leave in folders (Windows thumbnail caches and folder settings,
# macOS Finder data, the "Icon\r" folder icon, zip extraction folders). Any hidden file or folder counts too,
# which covers .DS_Store and the `._name.png` AppleDouble files macOS writes on non-Mac disks.
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx"})
MIN_IMAGES = 2  # FluxGym's own lower limit
MAX_IMAGES = 150


class DatasetError(ValueError):
    """A missing/empty image folder, too few images, or files that are not readable images."""


@dataclass(frozen=True)
class PreparedImage:
    image: Path
    caption: Path
    caption_kept: bool  # True when an existing caption was kept


@dataclass
class DatasetPlan:
    """What `apply_plan` will do; built and checked by `plan_dataset` without writing anything."""

    src: Path
    dest: Path
    trigger: str
    resolution: int
    images: list[Path]  # source images, in order
    captions: dict[str, str] = field(default_factory=dict)  # image name -> caption text from the source folder
    remove: list[Path] = field(default_factory=list)  # dataset files the source no longer has (replace=True)
    replace_captions: list[Path] = field(default_factory=list)  # dataset captions the source's caption replaces
    derived: list[Path] = field(default_factory=list)  # caches of removed images, leftovers of a killed prepare
    notes: list[str] = field(default_factory=list)  # said before anything is written


def is_junk(name: str) -> bool:
    """A file or folder that is never part of a dataset (see JUNK_NAMES); skipped with a note, not an error."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (sorted; junk such as hidden files ignored)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not is_junk(p.name) and p.suffix.lower() in IMAGE_EXTS)


def _shown(name: str) -> str:
    return name if name.isprintable() else repr(name)  # "Icon\r" must not move the terminal's cursor


def scan_image_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """All images of a source folder and notes about what was skipped, or one error naming every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    images = list_images(folder)
    entries = sorted(folder.iterdir())
    junk = [p.name for p in entries if is_junk(p.name)]
    subfolders = [p.name for p in entries if p.is_dir() and not is_junk(p.name)]
    stems = {p.stem for p in images}
    unused_text = [p.name for p in entries if p.is_file() and not is_junk(p.name)
                   and p.suffix.lower() == CAPTION_EXT and not (p.suffix == CAPTION_EXT and p.stem in stems)]
    # The trainer's own caches of this folder's images (an sd-scripts dataset trained before): rebuilt, not copied.
    caches = [p.name for p in entries if p.is_file() and not is_junk(p.name)
              and (m := _CACHE_RE.match(p.name)) and m["stem"] in stems]
    others = [p.name for p in entries if p.is_file() and not is_junk(p.name) and p.name not in caches
              and p.suffix.lower() not in IMAGE_EXTS and p.suffix.lower() != CAPTION_EXT]
    problems = [f"  - {name}: not an image ({', '.join(IMAGE_EXTS)}) or a caption (<image name>{CAPTION_EXT}); "
                "move it out of the folder" for name in others]
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
    notes = []
    if junk:
        notes.append(f"skipped {len(junk)} system/hidden file(s) in {folder}: {', '.join(_shown(n) for n in junk)}")
    if caches:
        shown = ", ".join(caches[:4]) + (f" and {len(caches) - 4} more" if len(caches) > 4 else "")
        notes.append(f"skipped {len(caches)} cache file(s) of the trainer in {folder} (rebuilt for the new "
                     f"dataset): {shown}")
    if subfolders:
        notes.append(f"subfolders are not read (only images directly in {folder}): {', '.join(subfolders)}")
    if unused_text:
        notes.append(f"not the caption of any image, ignored: {', '.join(unused_text)} "
                     f"(a caption is named like its image: img1.png -> img1{CAPTION_EXT})")
    return images, notes


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, with a leading byte-order mark (Windows Notepad writes one) dropped.

    Raises DatasetError naming the file and how to fix it; bytes, not read_text, so line endings stay as written.
    """
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf16 = ", it looks like UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DatasetError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}{utf16}); "
                           "open it in a text editor and save it with the encoding UTF-8") from exc


def _read_captions(plan: DatasetPlan) -> None:
    """Every caption the dataset will use, decoded now, so a bad one stops prepare before anything is copied."""
    problems = []
    for path in plan.images:
        source_caption = path.with_suffix(CAPTION_EXT)
        in_dataset = plan.dest / source_caption.name
        try:
            if source_caption.is_file() and source_caption.resolve() != in_dataset.resolve():
                plan.captions[path.name] = read_caption(source_caption)
            elif in_dataset.is_file():
                read_caption(in_dataset)  # kept as it is; the trainer reads it as UTF-8 too
        except DatasetError as exc:
            problems.append(f"  - {exc}")
    if problems:
        raise DatasetError("captions must be UTF-8 text:\n" + "\n".join(problems))


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
        with atomic_path(dst) as tmp:
            out.save(tmp, format=im.format or None)


def _dataset_conflicts(plan: DatasetPlan) -> tuple[list[Path], list[Path]]:
    """Dataset files that would be lost: (not in the source any more, captions the source would overwrite)."""
    dest = plan.dest
    names = {p.name for p in plan.images}
    stems = {p.stem for p in plan.images}
    gone = [p for p in list_images(dest) if p.name not in names]
    gone += [p for p in dest.glob("*" + CAPTION_EXT) if p.is_file() and not is_junk(p.name) and p.stem not in stems]
    overwritten = []
    for name, text in plan.captions.items():
        existing = dest / (Path(name).stem + CAPTION_EXT)
        if existing.is_file() and existing.read_bytes().removeprefix(_BOM) != text.encode("utf-8"):
            overwritten.append(existing)
    return sorted(gone), overwritten


def _derived_files(dest: Path, stems: set[str]) -> list[Path]:
    """Caches of images no longer in the dataset and temporary files of a killed prepare: made by us, not the user."""
    caches = [p for p in sorted(dest.iterdir())
              if p.is_file() and (m := _CACHE_RE.match(p.name)) and m["stem"] not in stems]
    return caches + stale_temp_files(dest)


def _conflict_lines(gone: list[Path], overwritten: list[Path], src: Path) -> list[str]:
    lines = [f"  - {p.name}: not in {src}" for p in gone]
    lines += [f"  - {p.name}: {src / p.name} holds a different caption" for p in overwritten]
    return lines


def plan_dataset(src: Path, dest: Path, *, trigger: str, resolution: int = 512,
                 replace: bool = False) -> DatasetPlan:
    """Check the image folder and the dataset against each other; raise DatasetError naming every problem."""
    check_one_line(trigger, "--trigger")
    if resolution <= 0:
        raise DatasetError(f"--resolution must be positive, got {resolution}")
    src, dest = Path(src), Path(dest)
    images, notes = scan_image_folder(src)
    names = [p.name.lower() for p in images]
    clashes = sorted({n for n in names if names.count(n) > 1})
    stems = [p.stem for p in images]
    clashes += sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise DatasetError(f"{src}: images would share a caption file: {', '.join(clashes)}; rename them")
    plan = DatasetPlan(src, dest, trigger, resolution, images, notes=notes)
    _read_captions(plan)
    if not dest.is_dir():
        return plan
    gone, overwritten = _dataset_conflicts(plan)
    if (gone or overwritten) and not replace:
        raise DatasetError(
            f"{dest} holds files that {src} does not (from an earlier prepare?):\n"
            + "\n".join(_conflict_lines(gone, overwritten, src))
            + "\nNothing was changed. To keep them, copy them into the image folder (or elsewhere); to make the "
            "dataset match the image folder, run prepare again with --replace (removes or overwrites the files "
            "listed).")
    plan.remove, plan.replace_captions = gone, overwritten
    plan.derived = _derived_files(dest, {p.stem for p in images})
    if gone or overwritten:
        plan.notes.append(f"--replace: making {dest} match {src}:\n" + "\n".join(
            [f"  - removing {p.name}" for p in gone] + [f"  - replacing {p.name} with {src / p.name}"
                                                        for p in overwritten]))
    return plan


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def apply_plan(plan: DatasetPlan) -> list[PreparedImage]:
    """Write the resized copies and captions, then remove what the plan removes."""
    plan.dest.mkdir(parents=True, exist_ok=True)
    done = []
    for path in plan.images:
        target = plan.dest / path.name
        _save_image(path, target, plan.resolution)
        caption = target.with_suffix(CAPTION_EXT)
        if path.name in plan.captions:
            write_text_atomic(caption, plan.captions[path.name], newline="")
            kept = True
        elif caption.is_file():
            kept = True  # a caption already in the dataset wins over the trigger, as in FluxGym
        else:
            write_text_atomic(caption, plan.trigger, newline="")
            kept = False
        done.append(PreparedImage(target, caption, kept))
    # Removal last: a kill before this point leaves extra files that the next prepare lists, never missing ones.
    written = [p.image for p in done] + [p.caption for p in done]
    for path in plan.remove + plan.derived:
        # On a case-insensitive disk an old IMG1.PNG is the file just written as img1.png: keep it.
        if path.exists() and not any(_same_file(path, w) for w in written):
            path.unlink()
    if not plan.trigger and not all(p.caption_kept for p in done):
        log.warning("no --trigger given: images without a caption got an empty caption file")
    return done


def prepare_dataset(src: Path, dest: Path, *, trigger: str, resolution: int = 512,
                    replace: bool = False) -> list[PreparedImage]:
    """Make `dest` the resized copy of every image of `src`, with one caption file each (plan, say, write)."""
    plan = plan_dataset(src, dest, trigger=trigger, resolution=resolution, replace=replace)
    for note in plan.notes:
        log.info(note)
    return apply_plan(plan)
