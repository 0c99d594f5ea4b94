"""--dataset_class: the images and captions come from the user's own Python class.

Upstream instantiates the class with its tokenizer and requires a subclass of its internal dataset classes, so
upstream's classes cannot run here. Our protocol, small enough to write in a few lines:
- `package.module.ClassName` is imported from the current directory first, then from the normal import path
  (PYTHONPATH, installed packages); it is constructed as `ClassName(args)` with the parsed flags
  (argparse.Namespace);
- the object is a sequence: `len(ds)` items, `ds[i]` a mapping with `image` (path to an image file, relative
  paths from the current directory), `caption` (str), optional `num_repeats` (int >= 1, default 1) and
  `is_reg` (bool, default false).
The items become dataset blueprints listing their images (dataset_config.blueprints_from_image_lists), so
buckets, caches, caption options, repeats and the validation split work as for image folders.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from library.errors import BadFileError, BadFlagError

FLAG = "--dataset_class"
ITEM_KEYS = ("image", "caption", "num_repeats", "is_reg")
_CONFLICTS = ("dataset_config", "train_data_dir", "in_json", "reg_data_dir")


class DatasetClassError(BadFlagError):
    """--dataset_class cannot be used: not importable, not the protocol, or an item's image is unusable."""


def check_flags(ns: argparse.Namespace) -> None:
    """--dataset_class replaces the other dataset sources; upstream silently ignores them then, we refuse."""
    if not ns.dataset_class:
        return
    for dest in _CONFLICTS:
        if getattr(ns, dest, None):
            raise DatasetClassError(f"{FLAG} {ns.dataset_class} with --{dest} {getattr(ns, dest)}: the class gives "
                                    f"all images and captions (upstream ignores --{dest} then); give only one of them")


def _import_module(name: str, cwd: Path):
    """The module `name`, its top-level package looked up in `cwd` first (no sys.path change)."""
    if name in sys.modules:
        return sys.modules[name]
    top = name.split(".")[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(cwd)])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[top] = module  # before exec: the module may import itself or its submodules
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[top]
                raise
    return importlib.import_module(name)


def load_class(spec: str, cwd: Path | None = None) -> Callable:
    """The class (or any callable) named `package.module.ClassName`."""
    module_name, _, class_name = spec.rpartition(".")
    if not module_name or not class_name:
        raise DatasetClassError(f"{FLAG} {spec!r}: expected package.module.ClassName (a module and a class)")
    cwd = cwd or Path.cwd()
    try:
        module = _import_module(module_name, cwd)
    except Exception as exc:  # the user's module: any import-time error is theirs to fix
        raise DatasetClassError(f"{FLAG} {spec}: cannot import module {module_name} ({type(exc).__name__}: {exc}); "
                                f"put it in the current directory ({cwd}) or on PYTHONPATH") from exc
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        where = getattr(module, "__file__", None) or module_name
        raise DatasetClassError(f"{FLAG} {spec}: module {module_name} ({where}) has no class {class_name}")
    return cls


def _item(spec: str, ds: Any, index: int, cwd: Path) -> tuple[Path, str, int, bool]:
    where = f"{FLAG} {spec}: item {index}"
    try:
        entry = ds[index]
    except Exception as exc:
        raise DatasetClassError(f"{where}: ds[{index}] failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, Mapping):
        raise DatasetClassError(f"{where} is a {type(entry).__name__}, not a mapping with 'image' and 'caption'")
    missing = [key for key in ("image", "caption") if key not in entry]
    if missing:
        raise DatasetClassError(f"{where} has no {' and no '.join(repr(k) for k in missing)} (it has: "
                                f"{', '.join(map(repr, entry)) or 'nothing'}); each item needs 'image' and 'caption'")
    unknown = [key for key in entry if key not in ITEM_KEYS]
    if unknown:  # a typo such as num_repeat would otherwise be ignored silently
        raise DatasetClassError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                                f"{', '.join(ITEM_KEYS)}")
    image, caption = entry["image"], entry["caption"]
    if not isinstance(image, (str, os.PathLike)):
        raise DatasetClassError(f"{where}: 'image' is a {type(image).__name__}, not a path to an image file")
    if not isinstance(caption, str):
        raise DatasetClassError(f"{where}: 'caption' is a {type(caption).__name__}, not a str")
    repeats, is_reg = entry.get("num_repeats", 1), entry.get("is_reg", False)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise DatasetClassError(f"{where}: 'num_repeats' must be an int of 1 or more, got {repeats!r}")
    if not isinstance(is_reg, bool):
        raise DatasetClassError(f"{where}: 'is_reg' must be true or false, got {is_reg!r}")
    path = Path(os.fspath(image)).expanduser()
    return (path if path.is_absolute() else cwd / path), caption, repeats, is_reg


def _check_image(path: Path, where: str) -> None:
    from PIL import Image

    if not path.is_file():
        raise BadFileError(f"image file {path} ({where}) does not exist")
    try:
        with Image.open(path):
            pass  # the header is enough here; the pixels are read when latents are cached
    except OSError as exc:
        raise BadFileError(f"image file {path} ({where}) cannot be read as an image: {exc}") from None


def read_items(spec: str, args: argparse.Namespace, cwd: Path | None = None) -> list[tuple[Path, str, int, bool]]:
    """(image, caption, num_repeats, is_reg) for every item of `ClassName(args)`, each checked."""
    cwd = cwd or Path.cwd()
    cls = load_class(spec, cwd)
    name = spec.rpartition(".")[2]
    try:
        ds = cls(args)
    except Exception as exc:
        raise DatasetClassError(f"{FLAG} {spec}: {name}(args) failed ({type(exc).__name__}: {exc})") from exc
    try:
        count = len(ds)
    except Exception as exc:
        raise DatasetClassError(f"{FLAG} {spec}: len() of the {name} object failed ({type(exc).__name__}: {exc}); "
                                "it must be a sequence of items") from exc
    if not isinstance(count, int) or count < 1:
        raise DatasetClassError(f"{FLAG} {spec}: len() is {count!r}; the class must give at least one item")
    items = [_item(spec, ds, index, cwd) for index in range(count)]
    for index, (path, *_rest) in enumerate(items):
        _check_image(path, f"item {index} of {FLAG} {spec}")
    return items


def blueprints_from_dataset_class(spec: str, args: argparse.Namespace, *, cli: dict,
                                 cwd: Path | None = None) -> list:
    """The run's dataset: consecutive items with the same (num_repeats, is_reg) form one subset, in item order."""
    from library.dataset_config import blueprints_from_image_lists

    groups: list[tuple[int, bool, list[tuple[Path, str]]]] = []
    for path, caption, repeats, is_reg in read_items(spec, args, cwd):
        if not groups or groups[-1][:2] != (repeats, is_reg):
            groups.append((repeats, is_reg, []))
        groups[-1][2].append((path, caption))
    return blueprints_from_image_lists(groups, where=f"{FLAG} {spec}", cli=cli)
