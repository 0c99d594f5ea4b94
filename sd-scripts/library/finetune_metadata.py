"""Upstream's fine-tuning metadata file (`--in_json` with `--train_data_dir`, or a dataset.toml subset's
`metadata_file` with optional `image_dir`): captions from one JSON file.

The file maps an image key to its entry: `{"<key>": {"caption": "...", "tags": "...", ...}, ...}` (what
upstream's merge_captions_to_metadata.py / merge_dd_tags_to_metadata.py write). Facts kept from upstream:
the key is an image path as written, or a name found in the image folder with one of the image extensions
added; the caption is `caption`, with `tags` appended after the caption separator (tags alone when there is
no caption; with enable_wildcard the tags go after every caption line); an entry with neither trains with an
empty caption. Not used here: `train_resolution` (buckets follow this trainer's bucket options) and
precomputed `.npz` latents (latents are cached by this trainer, so each entry needs its image).
"""
from __future__ import annotations

import json
from pathlib import Path

from library.dataset_config import IMAGE_EXTENSIONS, DatasetConfigError


def read_metadata(path: Path, label: str | None = None) -> dict[str, dict]:
    """The JSON file as {key: entry}; a clear error naming the file (as `label`, default --in_json) otherwise."""
    label = label or f"--in_json {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise DatasetConfigError(f"{label}: file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetConfigError(f"{label}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise DatasetConfigError(f"{label}: expected an object mapping image keys to entries, with at "
                                 "least one image")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise DatasetConfigError(f"{label}: the entry of {key!r} is not an object "
                                     '(expected {"caption": ..., "tags": ...})')
        for field in ("caption", "tags"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise DatasetConfigError(f"{label}: {field} of {key!r} is not a string")
    return data


def find_image(key: str, image_dir: Path) -> Path | None:
    """The image of a metadata key: the key itself when it names a file, else `image_dir/key` or
    `image_dir/key<ext>` for an image extension (lower or upper case)."""
    direct = Path(key).expanduser()
    candidates = [direct] if direct.is_absolute() else [direct, image_dir / key]
    candidates += [image_dir / f"{key}{ext}" for ext in IMAGE_EXTENSIONS]
    candidates += [image_dir / f"{key}{ext.upper()}" for ext in IMAGE_EXTENSIONS]
    for path in candidates:
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            return path
    return None


def entry_caption(entry: dict, separator: str, wildcard: bool) -> str:
    """caption + separator + tags, as upstream joins them (no space added: the separator is used as given)."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        caption, tags = tags, None  # tags alone (may be several lines)
    if wildcard:
        if tags is not None:
            tags = tags.replace("\n", separator)  # tags must be one line
        if caption is not None and tags is not None:
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    elif tags:
        caption = caption + separator + tags
    return caption or ""


def metadata_captions(metadata_file: Path, image_dir: Path, separator: str, wildcard: bool, *,
                      label: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) per entry, in the file's order; every missing image is named in one error.
    `label` names the file in messages (the subset's source; default `--in_json FILE`)."""
    label = label or f"--in_json {metadata_file}"
    data = read_metadata(metadata_file, label)
    pairs, missing = [], []
    for key, entry in data.items():
        path = find_image(key, image_dir)
        if path is None:
            missing.append(key)
            continue
        pairs.append((path, entry_caption(entry, separator, wildcard)))
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetConfigError(f"{label}: no image for {len(missing)} key(s) in {image_dir} ({shown}); each key "
                                 "must be an image path or a file name in that folder, with or without its extension "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
    return pairs
