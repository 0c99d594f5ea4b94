"""Read `dataset.toml` / `.json` (sd-scripts layout) into validated dataset blueprints.

- Layout `[general]` -> `[[datasets]]` -> `[[datasets.subsets]]`; every value is looked up
  subset -> dataset -> general -> command line -> default, first value that is not None wins.
- Keys upstream knows but this trainer does not implement are refused when set to a non-default value;
  unknown keys are refused; every error names the key and the file.
- Also builds blueprints from a kohya `--train_data_dir` with `<repeats>_<name>` folders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from library.captions import CaptionOptions
from library.errors import BadFileError
from library.image_augment import AugmentOptions, parse_face_crop_range

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESOLUTION_MULTIPLE = 16  # latents are /8 and FLUX packs 2x2 latent patches


class DatasetConfigError(BadFileError):
    """A dataset config (or the command-line values feeding it) cannot be used; the message says where."""


@dataclass(frozen=True)
class SubsetBlueprint:
    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    keep_tokens: int = 0  # fixed leading tags with shuffle_caption / caption_tag_dropout_rate
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    flip_aug: bool = False
    source: str = ""  # where this subset was defined, for messages
    caption_options: CaptionOptions = CaptionOptions()
    is_reg: bool = False  # regularisation (prior-preservation) images: loss weighted by --prior_loss_weight
    alpha_mask: bool = False  # the image's alpha channel weights the loss (masked loss)
    resize_interpolation: str | None = None  # PIL resampling name; None: lanczos
    metadata_file: Path | None = None  # --in_json / metadata_file: the image list and captions come from this JSON
    images: tuple[tuple[Path, str], ...] | None = None  # --dataset_class: (image, caption) pairs, no folder scan
    augment: AugmentOptions = AugmentOptions()  # random_crop, color_aug, face_crop_aug_range


@dataclass(frozen=True)
class DatasetBlueprint:
    subsets: tuple[SubsetBlueprint, ...]
    resolution: tuple[int, int]  # (width, height), multiples of 16
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    source: str = ""
    validation_split: float | None = None  # dataset.toml value; None: --validation_split (library.validation)
    validation_seed: int | None = None  # dataset.toml value; None: --validation_seed, else --seed


# Supported keys: name -> (kind, default). Dataset keys live in [general]/[[datasets]]; subset keys
# anywhere; image_dir only in a subset (as upstream).
DATASET_KEYS: dict[str, tuple[str, Any]] = {
    "resolution": ("resolution", None),
    "batch_size": ("pos_int", 1),
    "enable_bucket": ("bool", False),
    "min_bucket_reso": ("pos_int", 256),
    "max_bucket_reso": ("pos_int", 1024),
    "bucket_reso_steps": ("pos_int", 64),
    "bucket_no_upscale": ("bool", False),
    "validation_split": ("split", None),  # None: the command line's value (library.validation.dataset_splits)
    "validation_seed": ("nonneg_int", None),
}
SUBSET_KEYS: dict[str, tuple[str, Any]] = {
    "num_repeats": ("pos_int", 1),
    "class_tokens": ("str", None),
    "caption_extension": ("str", ".caption"),
    "keep_tokens": ("nonneg_int", 0),
    "caption_prefix": ("str", None),
    "caption_suffix": ("str", None),
    "flip_aug": ("bool", False),
    "caption_separator": ("str", ","),
    "cache_info": ("bool", False),  # upstream's metadata cache; nothing to cache here
    "shuffle_caption": ("bool", False),
    "keep_tokens_separator": ("str", ""),
    "secondary_separator": ("str", None),
    "enable_wildcard": ("bool", False),
    "caption_dropout_rate": ("rate", 0.0),
    "caption_dropout_every_n_epochs": ("nonneg_int", 0),
    "caption_tag_dropout_rate": ("rate", 0.0),
    "resize_interpolation": ("interpolation", None),
    "random_crop": ("bool", False),
    "color_aug": ("bool", False),
    "face_crop_aug_range": ("face_range", None),
}
SUBSET_ONLY_KEYS: dict[str, tuple[str, Any]] = {"image_dir": ("str", None), "is_reg": ("bool", False),
                                                "alpha_mask": ("bool", False), "metadata_file": ("str", None)}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
CAPTION_KEYS = ("shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator", "secondary_separator",
                "enable_wildcard", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate")

# Keys upstream understands that we do not implement: allowed only at their default value.
UNSUPPORTED_DATASET_KEYS = {
    "network_multiplier": 1.0,
}
UNSUPPORTED_SUBSET_KEYS = {
    "token_warmup_min": 1,
    "token_warmup_step": 0,
}
UNSUPPORTED_SUBSET_ONLY_KEYS = {
    "conditioning_data_dir": None,
    "custom_attributes": None,
}

_LEVEL_KEYS = {
    "general": set(DATASET_KEYS) | set(SUBSET_KEYS) | set(UNSUPPORTED_DATASET_KEYS) | set(UNSUPPORTED_SUBSET_KEYS),
    "dataset": set(DATASET_KEYS) | set(SUBSET_KEYS) | set(UNSUPPORTED_DATASET_KEYS) | set(UNSUPPORTED_SUBSET_KEYS),
    "subset": set(SUBSET_KEYS)
    | set(SUBSET_ONLY_KEYS)
    | set(UNSUPPORTED_SUBSET_KEYS)
    | set(UNSUPPORTED_SUBSET_ONLY_KEYS),
}
_UNSUPPORTED = {**UNSUPPORTED_DATASET_KEYS, **UNSUPPORTED_SUBSET_KEYS, **UNSUPPORTED_SUBSET_ONLY_KEYS}
_ALL_KNOWN = set(DATASET_KEYS) | set(SUBSET_KEYS) | set(SUBSET_ONLY_KEYS) | set(_UNSUPPORTED)
# upstream argparse dests that map to dataset keys (config_util does the same renaming)
_CLI_ALIASES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


def _is_default(value: Any, default: Any) -> bool:
    if value is None:
        return True
    if default is None:
        return value in ({}, [], "")
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default or value == default
    return value == default


def parse_resolution(value: Any, where: str) -> tuple[int, int] | None:
    """int -> square; [w, h] / (w, h) / "w,h" / "n" -> (w, h)."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise DatasetConfigError(f"resolution {value!r} in {where} is not 'N' or 'W,H'") from None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise DatasetConfigError(f"resolution in {where} must be a positive int or [width, height], got {value!r}")
    return int(value[0]), int(value[1])


def _check_value(key: str, value: Any, kind: str, where: str) -> Any:
    if value is None:
        return None
    if kind == "resolution":
        return parse_resolution(value, where)
    if kind == "interpolation":
        if value not in INTERPOLATIONS:
            raise DatasetConfigError(f"{key} in {where} must be one of {', '.join(INTERPOLATIONS)}, got {value!r}")
        return value
    if kind == "split":  # a held-out fraction, as --validation_split
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        if not ok:
            raise DatasetConfigError(f"{key} in {where} must be a number from 0 to below 1, got {value!r}")
        return float(value)
    if kind == "face_range":
        try:
            return parse_face_crop_range(value)
        except ValueError as exc:
            raise DatasetConfigError(f"{key} in {where} {exc}") from None
    if kind == "rate":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
        if not ok:
            raise DatasetConfigError(f"{key} in {where} must be a number from 0 to 1, got {value!r}")
        return float(value)
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind in ("pos_int", "nonneg_int"):
        ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 if kind == "pos_int" else value >= 0)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {"bool": "true or false", "pos_int": "a positive integer", "nonneg_int": "an integer >= 0"}
        raise DatasetConfigError(f"{key} in {where} must be {want.get(kind, 'a string')}, got {value!r}")
    return value


def _check_table(table: Any, level: str, where: str) -> dict:
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{where} must be a table of key = value pairs")
    for key, value in table.items():
        if key not in _ALL_KNOWN:
            raise DatasetConfigError(f"unknown key '{key}' in {where}; check the spelling (see README: dataset.toml)")
        if key not in _LEVEL_KEYS[level]:
            place = "[[datasets.subsets]]" if key in SUBSET_ONLY_KEYS or key in UNSUPPORTED_SUBSET_ONLY_KEYS else (
                "[general] or [[datasets]]"
            )
            raise DatasetConfigError(f"{key} in {where} is not allowed there; put it in {place}")
        if key in _UNSUPPORTED and not _is_default(value, _UNSUPPORTED[key]):
            raise DatasetConfigError(
                f"{key} in {where} is not supported by this trainer (value {value!r}); remove it or set it to "
                f"{_UNSUPPORTED[key]!r}"
            )
    return table


def _normalize_cli(cli: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (cli or {}).items():
        key = _CLI_ALIASES.get(key, key)
        if key in _ALL_KNOWN and value is not None:
            out[key] = value
    return out


class _Lookup:
    """First not-None value along subset -> dataset -> general -> cli -> default, remembering where it was."""

    def __init__(self, layers: list[tuple[Mapping[str, Any], str]]):
        self.layers = layers

    def get(self, key: str, kind: str, default: Any) -> tuple[Any, str]:
        for table, where in self.layers:
            if table.get(key) is not None:
                return _check_value(key, table[key], kind, where), where
        return default, "the default"



def _check_cli_unsupported(cli: Mapping[str, Any]) -> None:
    for key, default in _UNSUPPORTED.items():
        if key in cli and not _is_default(cli[key], default):
            raise DatasetConfigError(f"--{key} (command line) is not supported by this trainer; remove it")


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_image_dir(raw: Any, where: str) -> Path:
    if raw is None:
        raise DatasetConfigError(f"image_dir is required in {where}: the folder holding the training images")
    folder = Path(raw).expanduser()
    if not folder.exists():
        raise DatasetConfigError(f"image_dir '{folder}' in {where} does not exist")
    if not folder.is_dir():
        raise DatasetConfigError(f"image_dir '{folder}' in {where} is not a directory")
    if count_images(folder) == 0:
        raise DatasetConfigError(
            f"image_dir '{folder}' in {where} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return folder


def _build_subset(lookup: _Lookup, image_dir: Any, where: str, *, scan_dir: bool = True) -> SubsetBlueprint:
    values = {}
    for key in ("num_repeats", "class_tokens", "caption_extension", "keep_tokens", "caption_prefix",
                "caption_suffix", "flip_aug"):
        kind, default = SUBSET_KEYS[key]
        values[key] = lookup.get(key, kind, default)[0]
    ext = values["caption_extension"]
    if ext and not ext.startswith("."):
        ext = "." + ext  # "txt" would otherwise look for "img0txt"
    values["caption_extension"] = ext
    options = {key: values["keep_tokens"] if key == "keep_tokens" else lookup.get(key, *SUBSET_KEYS[key])[0]
               for key in CAPTION_KEYS}
    if not options["caption_separator"]:
        raise DatasetConfigError(f"caption_separator in {where} must not be empty")
    extras = {key: lookup.get(key, *SUBSET_ONLY_KEYS[key])[0] for key in ("is_reg", "alpha_mask")}
    extras["resize_interpolation"] = lookup.get("resize_interpolation", *SUBSET_KEYS["resize_interpolation"])[0]
    extras["augment"] = AugmentOptions(**{key: lookup.get(key, *SUBSET_KEYS[key])[0]
                                          for key in ("random_crop", "color_aug", "face_crop_aug_range")})
    folder = _check_image_dir(image_dir, where) if scan_dir else Path(image_dir)
    return SubsetBlueprint(image_dir=folder, source=where,
                           caption_options=CaptionOptions(**options), **extras, **values)


def _resolve_resolution(lookup: _Lookup, where: str) -> tuple[int, int]:
    reso, reso_where = lookup.get("resolution", "resolution", None)
    if reso is None:
        raise DatasetConfigError(f"resolution is not set for {where}; set resolution there or pass --resolution")
    rounded = tuple(max(RESOLUTION_MULTIPLE, v // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE) for v in reso)
    if rounded != reso:
        logger.warning("resolution %s from %s rounded down to %s (FLUX needs multiples of %d)",
                       reso, reso_where, rounded, RESOLUTION_MULTIPLE)
    return rounded  # type: ignore[return-value]


def _build_dataset(lookup: _Lookup, subsets: tuple[SubsetBlueprint, ...], where: str) -> DatasetBlueprint:
    values = {k: lookup.get(k, kind, default) for k, (kind, default) in DATASET_KEYS.items() if k != "resolution"}
    steps, steps_where = values["bucket_reso_steps"]
    if steps % 64:
        raise DatasetConfigError(f"bucket_reso_steps in {steps_where} must be a multiple of 64, got {steps}")
    if values["enable_bucket"][0]:
        (lo, lo_where), (hi, hi_where) = values["min_bucket_reso"], values["max_bucket_reso"]
        if lo > hi:
            raise DatasetConfigError(
                f"min_bucket_reso ({lo}, {lo_where}) is larger than max_bucket_reso ({hi}, {hi_where})")
        for key, (val, src) in (("min_bucket_reso", (lo, lo_where)), ("max_bucket_reso", (hi, hi_where))):
            if val % steps:
                raise DatasetConfigError(f"{key} in {src} must be divisible by bucket_reso_steps ({steps}), got {val}")
    return DatasetBlueprint(
        subsets=subsets,
        resolution=_resolve_resolution(lookup, where),
        source=where,
        **{k: v[0] for k, v in values.items()},
    )


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise DatasetConfigError(f"dataset config {path} (--dataset_config) does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetConfigError(f"cannot read dataset config {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetConfigError(f"dataset config {path} is not valid JSON: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DatasetConfigError(
            f"dataset config {path} is not valid TOML: {exc}. A quote inside a single-quoted value "
            "(e.g. a trigger word with an apostrophe) must be written as a double-quoted, escaped string"
        ) from exc


def load_dataset_config(path: str | Path, *, cli: Mapping[str, Any] | None = None) -> list[DatasetBlueprint]:
    """Parse and validate a dataset config; `cli` holds command-line fallbacks (batch_size, resolution, ...)."""
    path = Path(path)
    data = _read_config_file(path)
    if not isinstance(data, dict):
        raise DatasetConfigError(f"dataset config {path} must be a table with [general] and [[datasets]]")
    for key in data:
        if key not in ("general", "datasets"):
            raise DatasetConfigError(
                f"unknown key '{key}' at the top level of {path}; expected [general], [[datasets]]")
    general = _check_table(data.get("general", {}), "general", f"[general] in {path}")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(
            f"datasets in {path}: at least one [[datasets]] table with [[datasets.subsets]] is needed")
    cli_layer = (_normalize_cli(cli), "the command line")
    _check_cli_unsupported(cli_layer[0])
    blueprints = []
    for i, ds in enumerate(datasets, 1):
        ds_where = f"[[datasets]] #{i} in {path}"
        ds = dict(ds) if isinstance(ds, dict) else ds
        subsets_raw = ds.pop("subsets", None) if isinstance(ds, dict) else None
        _check_table(ds, "dataset", ds_where)
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise DatasetConfigError(f"subsets: {ds_where} has no [[datasets.subsets]] table (with image_dir)")
        subsets = []
        for j, sub in enumerate(subsets_raw, 1):
            sub_where = f"[[datasets.subsets]] #{j} of [[datasets]] #{i} in {path}"
            _check_table(sub, "subset", sub_where)
            lookup = _Lookup([(sub, sub_where), (ds, ds_where), (general, f"[general] in {path}"), cli_layer])
            if sub.get("metadata_file") is not None:
                subsets.append(_metadata_subset(lookup, sub, sub_where))
            else:
                subsets.append(_build_subset(lookup, sub.get("image_dir"), sub_where))
        ds_lookup = _Lookup([(ds, ds_where), (general, f"[general] in {path}"), cli_layer])
        blueprints.append(_build_dataset(ds_lookup, tuple(subsets), ds_where))
    return blueprints


def _metadata_subset(lookup: _Lookup, sub: dict, where: str) -> SubsetBlueprint:
    """Upstream's fine-tuning subset: `metadata_file` (as --in_json) with an optional `image_dir` where its keys
    are looked up (default: the metadata file's folder; keys may also be image paths)."""
    meta = Path(_check_value("metadata_file", sub["metadata_file"], "str", where)).expanduser()
    if not meta.is_file():
        raise DatasetConfigError(f"metadata_file '{meta}' in {where} does not exist")
    for key in ("is_reg", "class_tokens", "caption_extension"):
        if sub.get(key):  # upstream's fine-tuning subsets do not take them either
            raise DatasetConfigError(f"{key} and metadata_file in {where}: a metadata_file subset takes its images and "
                                     "captions from the file; move the images with their own settings to another "
                                     "subset with image_dir")
    folder = meta.parent
    if sub.get("image_dir") is not None:
        folder = Path(_check_value("image_dir", sub["image_dir"], "str", where)).expanduser()
        if not folder.is_dir():
            raise DatasetConfigError(f"image_dir '{folder}' in {where} is not a directory")
    subset = _build_subset(lookup, str(folder), where, scan_dir=False)
    return dataclasses.replace(subset, metadata_file=meta, class_tokens=None, source=f"metadata_file {meta} in {where}")


_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


def _kohya_subsets(root: Path, where: str, cli_layer, *, is_reg: bool) -> list[SubsetBlueprint]:
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _KOHYA_DIR.match(folder.name)
        if not match:
            logger.warning("ignoring %s: folder names must look like <repeats>_<name> (e.g. 10_mychar)", folder)
            continue
        layer = ({"num_repeats": int(match.group(1)), "class_tokens": match.group(2), "is_reg": is_reg},
                 f"folder {folder}")
        subsets.append(_build_subset(_Lookup([layer, cli_layer]), str(folder), f"folder {folder} of {where}"))
    return subsets


def blueprints_from_train_data_dir(train_data_dir: str | Path, *, cli: Mapping[str, Any] | None = None,
                                   reg_data_dir: str | Path | None = None,
                                   in_json: str | Path | None = None) -> list[DatasetBlueprint]:
    """kohya layout: `<train_data_dir>/<repeats>_<class tokens>/` folders, one subset each; the same layout under
    `--reg_data_dir` gives regularisation subsets. With `in_json`: one subset of the images in the folder itself,
    captioned by that metadata file (library.finetune_metadata), repeated --dataset_repeats times."""
    root = Path(train_data_dir).expanduser()
    where = f"--train_data_dir {root}"
    if not root.is_dir():
        raise DatasetConfigError(f"{where} is not a directory")
    cli_layer = (_normalize_cli(cli), "the command line")
    _check_cli_unsupported(cli_layer[0])
    if in_json:  # upstream's fine-tuning layout: the folder holds the images, the JSON file their captions
        if reg_data_dir:
            raise DatasetConfigError(f"--reg_data_dir with --in_json {in_json}: a fine-tuning metadata dataset has "
                                     "no regularisation images (as upstream); remove one of them")
        subset = _build_subset(_Lookup([cli_layer]), str(root), f"--in_json {in_json}")
        subset = dataclasses.replace(subset, metadata_file=Path(in_json).expanduser(), class_tokens=None)
        return [_build_dataset(_Lookup([cli_layer]), (subset,), where)]
    subsets = _kohya_subsets(root, where, cli_layer, is_reg=False)
    if not subsets:
        raise DatasetConfigError(f"{where} has no <repeats>_<name> folders with images")
    if reg_data_dir:
        reg_root = Path(reg_data_dir).expanduser()
        reg_where = f"--reg_data_dir {reg_root}"
        if not reg_root.is_dir():
            raise DatasetConfigError(f"{reg_where} is not a directory")
        reg_subsets = _kohya_subsets(reg_root, reg_where, cli_layer, is_reg=True)
        if not reg_subsets:
            raise DatasetConfigError(f"{reg_where} has no <repeats>_<name> folders with images")
        subsets += reg_subsets
    return [_build_dataset(_Lookup([cli_layer]), tuple(subsets), where)]


def blueprints_from_image_lists(groups: list[tuple[int, bool, list[tuple[Path, str]]]], *, where: str,
                                cli: Mapping[str, Any] | None = None) -> list[DatasetBlueprint]:
    """One dataset whose subsets list their images (library.dataset_class): each (num_repeats, is_reg, pairs)
    group becomes a subset; everything else (resolution, buckets, caption options) comes from the command line."""
    cli_layer = (_normalize_cli(cli), "the command line")
    _check_cli_unsupported(cli_layer[0])
    subsets = []
    for num_repeats, is_reg, pairs in groups:
        parents = [str(path.parent) for path, _ in pairs]
        try:
            folder = os.path.commonpath(parents)  # what ss_datasets names as the subset's image_dir
        except ValueError:  # different drives
            folder = parents[0]
        layer = ({"num_repeats": num_repeats, "is_reg": is_reg}, where)
        subset = _build_subset(_Lookup([layer, cli_layer]), folder, where, scan_dir=False)
        subsets.append(dataclasses.replace(subset, images=tuple(pairs), class_tokens=None))
    return [_build_dataset(_Lookup([cli_layer]), tuple(subsets), where)]


def check_text_encoder_cache(blueprints: list[DatasetBlueprint], data) -> None:
    """Upstream's rule: a caption option that changes the caption every step cannot use cached encoder outputs."""
    from library.cache_rules import text_cache_flag
    from library.captions import per_step_options

    flag = text_cache_flag(data.cache_text_encoder_outputs, data.cache_text_encoder_outputs_to_disk)
    if flag is None:
        return
    for bp in blueprints:
        for sub in bp.subsets:
            names = per_step_options(sub.caption_options)
            if names:
                raise DatasetConfigError(
                    f"{names[0]} (set for {sub.source}) changes the caption every step, but {flag} encodes each "
                    f"caption once: remove one of them (as upstream)")


def check_masked_loss(blueprints: list[DatasetBlueprint], masked_loss: bool) -> None:
    """--masked_loss weights the loss by alpha masks here; without any alpha_mask subset there is nothing to use."""
    if masked_loss and not any(sub.alpha_mask for bp in blueprints for sub in bp.subsets):
        raise DatasetConfigError("--masked_loss needs alpha masks: set alpha_mask = true in a subset or pass "
                                 "--alpha_mask (mask images from conditioning_data_dir are not supported)")
