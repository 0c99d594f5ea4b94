"""Per-step image augmentations (--random_crop, --color_aug, --face_crop_aug_range) with upstream's meanings.

- `AugmentOptions`: one subset's settings; `check_latent_cache` refuses them with a latent cache (as upstream).
- The crop plans (random bucket crop, the no-bucket window, the face-centred crop) and upstream's colour
  augmentation (OpenCV's 8-bit HSV hue shift or a gamma), as pure functions of arrays and a generator.
- `load_augmented`: one item's image for one step, drawn from a generator seeded by (seed, epoch, item,
  occurrence), so a resumed run and any DataLoader worker draw the same crop and colour.
- `batch_latents`: the training step's latents: the cached ones, or the batch's images encoded now.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from library.cache_rules import PER_STEP_IMAGE_OPTIONS
from library.errors import BadFileError

log = logging.getLogger(__name__)

HUE_SHIFT_LIMIT = 8.0  # OpenCV 8-bit hue units (0-179, i.e. degrees / 2), upstream's limit
COLOR_AUG_CHANCE = 0.33  # upstream: one draw <= 0.33 applies an augmentation ...
HUE_OR_GAMMA = 0.5  # ... then a second draw > 0.5 picks the hue shift, else the gamma
GAMMA_RANGE = (0.95, 1.05)
_HSV_SHIFT = 12  # OpenCV's fixed-point precision for its 8-bit RGB -> HSV conversion


@dataclass(frozen=True)
class AugmentOptions:
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    fixed_resolution: bool = False  # a dataset without buckets: crops are windows at the resolution (upstream)

    @property
    def per_step(self) -> bool:
        """True when the pixels change from step to step, so latents cannot be cached."""
        face = self.face_crop_aug_range is not None and self.fixed_resolution
        return self.random_crop or self.color_aug or face


def parse_face_crop_range(value: Any) -> tuple[float, float]:
    """"lo,hi" (the flag) or [lo, hi] (dataset.toml) -> (lo, hi); ValueError says what is wrong."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"must be two numbers 'low,high' (e.g. 2.0,4.0), got {value!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"needs 0 < low <= high, got {value!r}")
    return lo, hi


class AugmentCacheConflict(BadFileError):
    """A per-step augmentation together with a latent cache flag (upstream refuses it too)."""


def check_latent_cache(blueprints, *, cache_flag: str | None) -> None:
    """Before any model loads: random_crop/color_aug cannot use cached latents; face_crop_aug_range has no effect
    with them or with buckets (upstream ignores it there), which a warning says."""
    for bp in blueprints:
        for sub in bp.subsets:
            opts = sub.augment
            names = [n for n in PER_STEP_IMAGE_OPTIONS if getattr(opts, n)]
            if names and cache_flag:
                raise AugmentCacheConflict(
                    f"{names[0]} (set for {sub.source}) changes the image every step, but {cache_flag} encodes each "
                    f"image once: remove {cache_flag} (the images are then encoded every step) or turn {names[0]} "
                    "off (as upstream)")
            if opts.face_crop_aug_range is None:
                continue
            if bp.enable_bucket:
                log.warning("face_crop_aug_range (set for %s) has no effect with enable_bucket (upstream uses it only "
                            "without buckets)", sub.source)
            elif cache_flag:
                log.warning("face_crop_aug_range (set for %s) has no effect with %s: the latents are cached from the "
                            "centre crop (as upstream); remove %s to crop around faces", sub.source, cache_flag,
                            cache_flag)


def augment_rng(seed: int, epoch: int, index: int, occurrence: int = 0) -> np.random.Generator:
    """The generator for one item's crop and colour at one place of the run (a hash: no state between workers)."""
    digest = hashlib.sha256(f"augment:{seed}:{epoch}:{index}:{occurrence}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Like random.randint: lo..hi, both ends included."""
    return int(rng.integers(lo, hi, endpoint=True))


# ---------------------------------------------------------------- crops


def face_box(path: Path) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from the last four `_`-separated integers of the file stem (upstream's naming), else None."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if cx > 0 and max(w, h) > 0 else None


def face_caption_image(path: Path) -> Path | None:
    """Upstream also looks for the caption of `name_cx_cy_w_h.png` under `name`: the path to ask for, or None."""
    tokens = Path(path).stem.split("_")
    return Path(path).with_name("_".join(tokens[:-4]) + Path(path).suffix) if len(tokens) >= 5 else None


def random_bucket_offsets(resized: tuple[int, int], bucket: tuple[int, int], rng: np.random.Generator
                          ) -> tuple[int, int]:
    """(left, top) of the bucket inside the resized image: uniform over every position (width drawn first)."""
    left = _randint(rng, 0, resized[0] - bucket[0]) if resized[0] > bucket[0] else 0
    top = _randint(rng, 0, resized[1] - bucket[1]) if resized[1] > bucket[1] else 0
    return left, top


def window_offsets(size: tuple[int, int], target: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Without buckets: (left, top) of a target-sized window of the unresized image (upstream draws height first)."""
    top = _randint(rng, 0, size[1] - target[1]) if size[1] > target[1] else 0
    left = _randint(rng, 0, size[0] - target[0]) if size[0] > target[0] else 0
    return left, top


def face_crop_plan(size: tuple[int, int], target: tuple[int, int], face: tuple[int, int, int, int],
                   face_range: tuple[float, float], random_crop: bool, rng: np.random.Generator
                   ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Upstream's crop around a face: ((scaled w, h), (left, top)). The scale puts the face's larger side between
    min(target)/hi and min(target)/lo (never above 1); the window is centred on the face, shifted at random."""
    (width, height), (tw, th) = size, target
    cx, cy, fw, fh = face
    if (width, height) == (tw, th):
        return size, (0, 0)
    face_size = max(fw, fh)
    short = min(tw, th)
    cover = max(th / height, tw / width)
    min_scale = min(1.0, max(cover, short / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face_size * face_range[0])))
    if min_scale < cover:  # ours: an image smaller than the resolution is scaled up to cover it (upstream fails)
        min_scale = max_scale = cover
    scale = min_scale if min_scale >= max_scale else float(rng.uniform(min_scale, max_scale))
    nw, nh = int(width * scale + 0.5), int(height * scale + 0.5)
    face_x, face_y = int(cx * scale + 0.5), int(cy * scale + 0.5)
    offsets = []
    for target_len, length, face_p in ((th, nh, face_y), (tw, nw, face_x)):  # height first, as upstream
        p1 = face_p - target_len // 2
        if random_crop:  # a shift of -reach..+reach, peaked at 0: the face is mostly central, background included
            reach = max(length - face_p, face_p)
            p1 += _randint(rng, 0, reach) + _randint(rng, 0, reach) - reach
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            p1 += _randint(rng, -(face_size // 20), face_size // 20)
        offsets.append(max(0, min(p1, length - target_len)))
    top, left = offsets
    return (nw, nh), (left, top)


# ---------------------------------------------------------------- colour (OpenCV 8-bit HSV, as upstream uses it)


def _rgb_to_hsv8(first: np.ndarray, green: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, ...]:
    """OpenCV's fixed-point 8-bit conversion for BGR order: `first` is its blue, `last` its red. Upstream passes RGB
    arrays to COLOR_BGR2HSV, so our red plays its blue; the round trip is consistent, only the hue axis mirrors."""
    b, g, r = (c.astype(np.int64) for c in (first, green, last))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    half = 1 << (_HSV_SHIFT - 1)
    # lookup tables as OpenCV builds them: round-half-even of (255 << 12) / v and (180 << 12) / (6 * diff)
    sdiv = np.rint((255 << _HSV_SHIFT) / np.maximum(v, 1)).astype(np.int64) * (v > 0)
    hdiv = np.rint((180 << _HSV_SHIFT) / (6.0 * np.maximum(diff, 1))).astype(np.int64) * (diff > 0)
    s = (diff * sdiv + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return h.astype(np.uint8), s.astype(np.uint8), v.astype(np.uint8)


_SECTORS = ((1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0))  # (first, green, last) per sector


def _hsv8_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> BGR (float32 math, rounded half to even); returns channels in (first, green, last)."""
    hf = h.astype(np.float32) * np.float32(6.0 / 180.0)
    sf = s.astype(np.float32) * np.float32(1.0 / 255.0)
    vf = v.astype(np.float32) * np.float32(1.0 / 255.0)
    hf = np.mod(hf, np.float32(6.0))
    sector = np.floor(hf).astype(np.int64)
    frac = hf - sector.astype(np.float32)
    one = np.float32(1.0)

    def one_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # 1 - a*b rounded once, as OpenCV's fused multiply-add gives it (matches cv2 on every 8-bit HSV value)
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)

    tab = np.stack([vf, vf * (one - sf), vf * one_minus(sf, frac), vf * one_minus(sf, one - frac)])
    out = np.empty(h.shape + (3,), dtype=np.float32)
    table = np.array(_SECTORS)
    for channel in range(3):
        pick = table[np.clip(sector, 0, 5), channel]
        out[..., channel] = np.take_along_axis(tab, pick[None], axis=0)[0]
    grey = s == 0
    out[grey] = vf[grey][:, None]
    return np.clip(np.rint(out * np.float32(255.0)), 0, 255).astype(np.uint8)


def hue_shift(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Upstream's hue shift of a uint8 [H, W, 3] image: 8-bit hue (0-179) plus `shift` (a negative shift wraps to
    180 + shift), modulo 180, truncated to an integer, then back to RGB."""
    h, s, v = _rgb_to_hsv8(rgb[..., 0], rgb[..., 1], rgb[..., 2])
    shift = 180.0 + shift if shift < 0 else shift
    h = np.floor(np.mod(h.astype(np.float64) + shift, 180.0)).astype(np.uint8)
    return _hsv8_to_rgb(h, s, v)


def gamma_adjust(rgb: np.ndarray, gamma: float) -> np.ndarray:
    """Upstream's gamma: the 0-255 values themselves raised to `gamma`, clipped, truncated to uint8."""
    return np.clip(rgb.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def color_aug(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Upstream's color_aug: with chance 0.33 a change, half of those a hue shift in [-8, 8), else a gamma."""
    if rng.random() > COLOR_AUG_CHANCE:
        return rgb
    if rng.random() > HUE_OR_GAMMA:
        return hue_shift(rgb, float(rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)))
    return gamma_adjust(rgb, float(rng.uniform(*GAMMA_RANGE)))


# ---------------------------------------------------------------- one item, one step


def crop_plan(size: tuple[int, int], item, rng: np.random.Generator | None
              ) -> tuple[tuple[int, int], tuple[int, int, int, int], str]:
    """How the item's image of `size` becomes its bucket: (resize to, crop box, resampling name); random where the
    options say so and `rng` is given, else the centre crop the latent cache uses."""
    from library.dataset import resize_plan

    opts, target = item.augment, item.bucket_reso
    if rng is not None and opts.fixed_resolution:
        face = face_box(item.image_path) if opts.face_crop_aug_range else None
        if face is not None:  # upstream resizes with OpenCV's area filter here
            scaled, (left, top) = face_crop_plan(size, target, face, opts.face_crop_aug_range, opts.random_crop, rng)
            return scaled, (left, top, left + target[0], top + target[1]), item.resize_interpolation or "area"
        if opts.random_crop:
            if size[0] < target[0] or size[1] < target[1]:  # ours: too small, scale up to cover first
                scale = max(target[0] / size[0], target[1] / size[1])
                size = (max(target[0], math.ceil(size[0] * scale)), max(target[1], math.ceil(size[1] * scale)))
            left, top = window_offsets(size, target, rng)
            return size, (left, top, left + target[0], top + target[1]), item.resize_interpolation or "lanczos"
    resized, (left, top, _, _) = resize_plan(item.original_size, target)
    if rng is not None and opts.random_crop:
        left, top = random_bucket_offsets(resized, target, rng)
    return resized, (left, top, left + target[0], top + target[1]), item.resize_interpolation or "lanczos"


def load_augmented(item, *, rng: np.random.Generator | None, flip: bool) -> tuple[torch.Tensor, np.ndarray | None]:
    """The item's image for one step as float32 [3, H, W] in [-1, 1], and its alpha mask at latent size when the
    item has alpha_mask (cropped and flipped with the image). `rng` None: no augmentation (validation)."""
    from library.dataset import RESAMPLING, DatasetError

    try:
        with Image.open(item.image_path) as img:
            # colour and alpha resized apart, as the latent cache does (PIL would premultiply an RGBA resize)
            layers = [img.convert("RGB")] + ([img.convert("RGBA").getchannel("A")] if item.alpha_mask else [])
    except OSError as exc:
        raise DatasetError(f"cannot read image {item.image_path}: {exc}") from exc
    size, box, resampling = crop_plan(layers[0].size, item, rng)
    layers = [(layer if layer.size == size else layer.resize(size, RESAMPLING[resampling])).crop(box)
              for layer in layers]
    pixels = np.array(layers[0], dtype=np.uint8)
    if rng is not None and item.augment.color_aug:
        pixels = color_aug(pixels, rng)
    if flip:
        pixels = pixels[:, ::-1]
    mask = None
    if item.alpha_mask:  # no alpha channel in the file: RGBA conversion gives 255, a mask of ones (as upstream)
        alpha = np.array(layers[1], dtype=np.float32)
        alpha = torch.from_numpy(np.ascontiguousarray(alpha[:, ::-1] if flip else alpha) / 255.0)
        height, width = alpha.shape
        mask = torch.nn.functional.interpolate(alpha[None, None], size=(height // 8, width // 8), mode="area")[0, 0]
        mask = mask.numpy()
    image = torch.from_numpy(pixels.astype(np.float32))
    return (image / 127.5 - 1.0).permute(2, 0, 1).contiguous(), mask


def live_sample(dataset, epoch: int, index: int, occurrence: int, flipped: bool, augment: bool) -> dict:
    """The image part of a training sample when latents are not cached (per-step augmentation)."""
    rng = augment_rng(dataset.seed, epoch, index, occurrence) if augment else None
    image, mask = load_augmented(dataset.items[index], rng=rng, flip=flipped)
    sample = {"image": image}
    if mask is not None:
        sample["alpha_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
    return sample


def needs_live_images(items, *, cache_flag: str | None) -> bool:
    """Per-step encoding: some item's pixels change every step and no latent cache flag was given."""
    return cache_flag is None and any(item.augment.per_step for item in items)


def batch_latents(session, batch: dict, seed: int) -> torch.Tensor:
    """The batch's latents [B, 16, h, w] on the device: cached ones as they are, or its augmented images encoded
    now by the autoencoder (no gradients, the AE's dtype, a posterior sample seeded by `seed`)."""
    if "latents" in batch:
        return batch["latents"].to(session.device, session.weight_dtype)
    from library.flux_loading import encode_latents

    ae = session.models.ae
    if ae.device != session.device:  # sampling parks it on the CPU afterwards
        ae.to(session.device)
    # its own stream: the step's noise generator is seeded with `seed` itself
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + 0x632BE5AB) % 2**63)
    with torch.no_grad():
        latents = encode_latents(ae, batch["images"].to(session.device, ae.dtype), generator)
    return latents.float().to(session.device, session.weight_dtype)


