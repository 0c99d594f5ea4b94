"""Latent and text-encoder output caches, in memory or as upstream-compatible `.npz` files.

- File names and npz keys are upstream's (`<stem>_<W>x<H>_flux.npz`, `<stem>_flux_te.npz`), plus our
  fingerprint key, so a changed image, caption, tokenizer/encoder or setting is detected and re-made.
- A stale, corrupt or truncated file is reported (warning naming the file) and re-made; files written by
  upstream carry no fingerprint and are treated as stale.
- Every write is atomic (npz_io.atomic_savez); every read is bounded by --cache_io_timeout.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from library import console_markers
from library.dataset import TE_KEYS, ImageItem, TrainDataset, load_alpha_mask, load_image_tensor, resize_plan
from library.npz_io import CacheReadTimeout, atomic_savez, bounded_npz_load, remove_stale_temps

logger = logging.getLogger(__name__)

LATENTS_NPZ_SUFFIX = "_flux.npz"
TE_NPZ_SUFFIX = "_flux_te.npz"
FINGERPRINT_KEY = "fluxtrain_fingerprint"  # ours; upstream ignores unknown keys
_UNREADABLE = (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile)


def latent_cache_path(image_path: str | Path, original_size: tuple[int, int]) -> Path:
    image_path = Path(image_path)
    return image_path.with_name(f"{image_path.stem}_{original_size[0]:04d}x{original_size[1]:04d}{LATENTS_NPZ_SUFFIX}")


def te_cache_path(image_path: str | Path) -> Path:
    image_path = Path(image_path)
    return image_path.with_name(f"{image_path.stem}{TE_NPZ_SUFFIX}")


def latent_key_suffix(bucket_reso: tuple[int, int]) -> str:
    """`_{h}x{w}` in latent pixels (bucket / 8), as upstream."""
    return f"_{bucket_reso[1] // 8}x{bucket_reso[0] // 8}"


def file_identity(path: str | Path) -> str:
    """Cheap content identity of a weights file (or folder): size plus a hash of its first and last MiB."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    total = 0
    for file in files:
        size = file.stat().st_size
        total += size
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read())
        digest.update(f"|{file.relative_to(path) if path.is_dir() else ''}|{size}".encode())
    return f"{total}:{digest.hexdigest()[:32]}"


def _read_for_validation(path: Path, io_timeout: float | None) -> tuple[dict | None, str | None]:
    """(arrays, None) when readable; (None, reason) when missing/corrupt. A stalled read still raises."""
    if not path.exists():
        return None, "missing"
    try:
        # reading every array makes zipfile check each member's CRC, so a damaged file is caught here
        return bounded_npz_load(path, timeout=io_timeout), None
    except CacheReadTimeout:
        raise
    except _UNREADABLE as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bf16; upstream stores float32 too
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _disk_read(path: Path, key: str, io_timeout: float | None) -> np.ndarray:
    try:
        return bounded_npz_load(path, timeout=io_timeout, keys=[key])[key]
    except CacheReadTimeout:
        raise
    except _UNREADABLE as exc:
        raise RuntimeError(f"cache file {path} became unreadable during training ({exc}); delete it and "
                           "restart to re-make it") from exc


# ---------------------------------------------------------------- latents


@dataclass
class LatentCache:
    """Per item index: arrays in memory, or (file, key suffix) on disk read with a bounded load."""

    io_timeout: float | None = None
    memory: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    disk: dict[int, tuple[Path, str]] = field(default_factory=dict)
    alpha_masks: dict[int, np.ndarray] = field(default_factory=dict)  # latent-size loss masks (alpha_mask)

    def latents_for(self, index: int, flipped: bool = False) -> np.ndarray:
        name = "latents_flipped" if flipped else "latents"
        if index in self.memory:
            return self.memory[index][name]
        path, suffix = self.disk[index]
        return _disk_read(path, f"{name}{suffix}", self.io_timeout)


def _image_fingerprint(item: ImageItem, encoder_fingerprint: str) -> str:
    digest = hashlib.sha256(item.image_path.read_bytes())
    digest.update(f"|bucket={item.bucket_reso[0]}x{item.bucket_reso[1]}|encoder={encoder_fingerprint}".encode())
    if item.resize_interpolation:  # absent for the default, so caches made before the option stay valid
        digest.update(f"|interp={item.resize_interpolation}".encode())
    return digest.hexdigest()


def _summarize(arrays: dict | None, reason: str | None) -> tuple[dict | None, str | None]:
    """Keep key names and fingerprint strings only, so planning does not hold every file in memory."""
    if arrays is None:
        return None, reason
    return {k: (str(v) if k.startswith(FINGERPRINT_KEY) else None) for k, v in arrays.items()}, None


def _latents_valid(arrays: dict | None, reason: str | None, suffix: str, fp: str, need_flip: bool) -> str | None:
    """None when the file holds good latents for this bucket, else why not."""
    if arrays is None:
        return reason
    fp_key = f"{FINGERPRINT_KEY}{suffix}"
    if f"latents{suffix}" not in arrays:
        return f"has no latents{suffix}"
    if fp_key not in arrays:
        return "has no fingerprint (written by another trainer?)"
    if str(arrays[fp_key]) != fp:
        return "image, bucket or encoder changed"
    if need_flip and f"latents_flipped{suffix}" not in arrays:
        return f"has no latents_flipped{suffix} (flip_aug)"
    return None


def _latent_arrays(item: ImageItem, latents: np.ndarray, flipped: np.ndarray | None, fp: str) -> dict:
    suffix = latent_key_suffix(item.bucket_reso)
    _, crop = resize_plan(item.original_size, item.bucket_reso)
    arrays = {
        f"latents{suffix}": latents.astype(np.float32),
        f"original_size{suffix}": np.array(item.original_size, dtype=np.int64),
        f"crop_ltrb{suffix}": np.array(crop, dtype=np.int64),
        f"{FINGERPRINT_KEY}{suffix}": np.array(fp),  # unicode array: loads with allow_pickle=False
    }
    if flipped is not None:
        arrays[f"latents_flipped{suffix}"] = flipped.astype(np.float32)
    return arrays


def _encode_images(items: list[ImageItem], encode_fn: Callable, flip: bool) -> np.ndarray:
    images = torch.stack([load_image_tensor(item, flip=flip) for item in items])
    with torch.no_grad():
        return _to_numpy(encode_fn(images)).astype(np.float32)


def _plan_latents(dataset: TrainDataset, to_disk: bool, io_timeout, fingerprint: str):
    """Which (image, bucket) pairs need encoding; valid files are reused. Returns (todo, cache, fingerprints)."""
    cache = LatentCache(io_timeout=io_timeout)
    todo: dict[tuple, list[int]] = {}  # (path, bucket) -> item indices sharing one encoding
    files: dict[Path, tuple] = {}
    fps: dict[tuple, str] = {}
    for index, item in enumerate(dataset.items):
        key = (item.image_path, item.bucket_reso)
        if key in todo:
            todo[key].append(index)
            continue
        fps[key] = fp = _image_fingerprint(item, fingerprint)
        if not to_disk:
            todo[key] = [index]
            continue
        path = latent_cache_path(item.image_path, item.original_size)
        if path not in files:
            remove_stale_temps(path)
            files[path] = _summarize(*_read_for_validation(path, io_timeout))
        suffix = latent_key_suffix(item.bucket_reso)
        problem = _latents_valid(*files[path], suffix, fp, item.flip_aug)
        if problem is None:
            cache.disk[index] = (path, suffix)
        else:
            if problem != "missing":
                logger.warning("latent cache %s is stale or damaged (%s); re-making it", path, problem)
            todo[key] = [index]
    return todo, cache, fps


def cache_latents(dataset: TrainDataset, encode_fn: Callable[[torch.Tensor], torch.Tensor], *, to_disk: bool,
                  batch_size: int = 1, io_timeout: float | None = None, progress: bool = True,
                  fingerprint: str = "") -> LatentCache:
    """Encode every (image, bucket) once; `fingerprint` may identify the AE weights (see file_identity)."""
    print(console_markers.CACHING_LATENTS, flush=True)
    todo, cache, fps = _plan_latents(dataset, to_disk, io_timeout, fingerprint)
    by_bucket: dict[tuple, list[tuple]] = {}
    for key in todo:
        by_bucket.setdefault(key[1], []).append(key)
    with tqdm(total=len(todo), desc=console_markers.CACHING_LATENTS_BAR, disable=not progress) as bar:
        for bucket in sorted(by_bucket):
            keys = by_bucket[bucket]
            for start in range(0, len(keys), max(1, batch_size)):
                chunk = keys[start:start + max(1, batch_size)]
                firsts = [dataset.items[todo[k][0]] for k in chunk]
                latents = _encode_images(firsts, encode_fn, flip=False)
                need_flip = any(dataset.items[i].flip_aug for k in chunk for i in todo[k])
                flipped = _encode_images(firsts, encode_fn, flip=True) if need_flip else None
                for n, key in enumerate(chunk):
                    arrays = _latent_arrays(firsts[n], latents[n], None if flipped is None else flipped[n], fps[key])
                    _store_latents(cache, todo[key], firsts[n], arrays, to_disk)
                bar.update(len(chunk))
    reused = len(dataset.items) - sum(map(len, todo.values()))
    logger.info("latents: %d encoded, %d reused from disk", len(todo), reused)
    cache.alpha_masks = {i: load_alpha_mask(item) for i, item in enumerate(dataset.items) if item.alpha_mask}
    return cache


def _store_latents(cache: LatentCache, indices: list[int], item: ImageItem, arrays: dict, to_disk: bool) -> None:
    suffix = latent_key_suffix(item.bucket_reso)
    if not to_disk:
        entry = {"latents": arrays[f"latents{suffix}"], "latents_flipped": arrays.get(f"latents_flipped{suffix}")}
        for index in indices:
            cache.memory[index] = entry
        return
    path = latent_cache_path(item.image_path, item.original_size)
    # other buckets of the same image stay in the file, as upstream; re-read now instead of holding
    # every file in memory during caching
    existing, _ = _read_for_validation(path, cache.io_timeout)
    merged = {k: v for k, v in (existing or {}).items() if not k.endswith(suffix)}
    merged.update(arrays)
    atomic_savez(path, merged)
    for index in indices:
        cache.disk[index] = (path, suffix)


# ---------------------------------------------------------------- text-encoder outputs


@dataclass
class TECache:
    """Per item index: the four TE outputs in memory, or the `_flux_te.npz` file to read (bounded)."""

    io_timeout: float | None = None
    memory: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    disk: dict[int, Path] = field(default_factory=dict)

    def outputs_for(self, index: int) -> dict[str, np.ndarray]:
        if index in self.memory:
            return self.memory[index]
        path = self.disk[index]
        try:
            return bounded_npz_load(path, timeout=self.io_timeout, keys=list(TE_KEYS))
        except CacheReadTimeout:
            raise
        except _UNREADABLE as exc:
            raise RuntimeError(f"cache file {path} became unreadable during training ({exc}); delete it and "
                               "restart to re-make it") from exc


def te_fingerprint(caption: str, encoder_fingerprint: str, t5_max_length, apply_t5_attn_mask: bool) -> str:
    text = f"{caption}\0{encoder_fingerprint}\0max_len={t5_max_length}\0mask={bool(apply_t5_attn_mask)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _te_valid(arrays: dict | None, reason: str | None, fp: str, apply_mask: bool) -> str | None:
    if arrays is None:
        return reason
    missing = [k for k in (*TE_KEYS, "apply_t5_attn_mask") if k not in arrays]
    if missing:
        return f"has no {', '.join(missing)}"
    if FINGERPRINT_KEY not in arrays:
        return "has no fingerprint (written by another trainer?)"
    if bool(arrays["apply_t5_attn_mask"]) != bool(apply_mask):
        return "apply_t5_attn_mask changed"
    if str(arrays[FINGERPRINT_KEY]) != fp:
        return "caption, tokenizer/encoder or t5 max length changed"
    return None


def _te_file_ok(path: Path, fp: str, apply_mask: bool, io_timeout) -> bool:
    remove_stale_temps(path)
    problem = _te_valid(*_summarize(*_read_for_validation(path, io_timeout)), fp, apply_mask)
    if problem not in (None, "missing"):
        logger.warning("text encoder cache %s is stale or damaged (%s); re-making it", path, problem)
    return problem is None


def _plan_te(dataset: TrainDataset, to_disk: bool, fingerprint: str, apply_mask: bool, max_len, io_timeout):
    """Returns (cache, todo: fingerprint -> (caption, [(index, path or None)]))."""
    cache = TECache(io_timeout=io_timeout)
    todo: dict[str, tuple[str, list]] = {}
    claimed: dict[Path, str] = {}  # file -> fingerprint it holds in this run
    valid: dict[Path, bool] = {}
    for index, item in enumerate(dataset.items):
        fp = te_fingerprint(item.caption, fingerprint, max_len, apply_mask)
        path = te_cache_path(item.image_path) if to_disk else None
        if path is not None and claimed.setdefault(path, fp) != fp:
            # the same image in two subsets with different captions: one file holds one caption
            logger.warning("%s is used with two different captions; the second stays in memory", item.image_path)
            path = None
        if path is not None:
            if path not in valid:
                valid[path] = _te_file_ok(path, fp, apply_mask, io_timeout)
            if valid[path]:
                cache.disk[index] = path
                continue
        todo.setdefault(fp, (item.caption, []))[1].append((index, path))
    return cache, todo


def cache_text_encoder_outputs(dataset: TrainDataset, encode_fn: Callable[[list[str]], dict], *, to_disk: bool,
                               fingerprint: str, apply_t5_attn_mask: bool, batch_size: int = 1,
                               io_timeout: float | None = None, t5_max_length: int | None = None,
                               progress: bool = True) -> TECache:
    """Encode each distinct caption once. `fingerprint` names the tokenizers/encoders (e.g. file_identity)."""
    print(console_markers.CACHING_TEXT, flush=True)
    cache, todo = _plan_te(dataset, to_disk, fingerprint, apply_t5_attn_mask, t5_max_length, io_timeout)
    fps, reused = list(todo), len(cache.disk)
    step = max(1, batch_size)
    with tqdm(total=len(fps), desc=console_markers.CACHING_TEXT_BAR, disable=not progress) as bar:
        for start in range(0, len(fps), step):
            chunk = fps[start:start + step]
            with torch.no_grad():
                out = encode_fn([todo[fp][0] for fp in chunk])
            out = {name: _to_numpy(out[name]) for name in TE_KEYS}
            for n, fp in enumerate(chunk):
                arrays = {name: out[name][n] for name in TE_KEYS}
                _store_te(cache, todo[fp][1], arrays, fp, apply_t5_attn_mask)
            bar.update(len(chunk))
    logger.info("text encoder outputs: %d captions encoded, %d files reused", len(fps), reused)
    return cache


def _store_te(cache: TECache, entries: list, arrays: dict, fp: str, apply_mask: bool) -> None:
    written: set[Path] = set()
    for index, path in entries:
        if path is None:
            cache.memory[index] = arrays
            continue
        if path not in written:
            atomic_savez(path, {**arrays, "apply_t5_attn_mask": np.array(bool(apply_mask)),
                                FINGERPRINT_KEY: np.array(fp)})
            written.add(path)
        cache.disk[index] = path
