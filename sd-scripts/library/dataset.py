"""Training items, aspect-ratio buckets and deterministic, resumable epoch batches.

- `build_dataset`: one `ImageItem` per image (caption file or class_tokens, prefix/suffix, bucket).
- Buckets: fixed resolution (cover + center crop) or aspect-ratio buckets, all sides multiples of 16.
- `TrainDataset.batches_for_epoch(epoch)` depends only on (seed, epoch), so the trainer's sampler
  (`train_loop.ResumableBatchSampler`) resumes mid-epoch with nothing replayed; `__getitem__` reads
  cached latents/TE outputs, or the augmented image when latents are encoded per step (library.image_augment).
- `load_image_tensor` gives the resized/cropped image that latent caching encodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from library import captions, finetune_metadata, image_augment
from library.errors import BadFileError
from library.dataset_config import IMAGE_EXTENSIONS, DatasetBlueprint, SubsetBlueprint
from library.fault_injection import inject_point

logger = logging.getLogger(__name__)

TE_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")
_LIST_LIMIT = 20  # how many file names a warning lists before "... and N more"


class DatasetError(BadFileError):
    """The images/captions on disk cannot be used as a dataset; the message names the files."""


@dataclass(frozen=True)
class ImageItem:
    image_path: Path
    caption: str
    bucket_reso: tuple[int, int]  # (width, height) the image is resized/cropped to
    original_size: tuple[int, int]  # (width, height) on disk
    flip_aug: bool
    num_repeats: int
    dataset_index: int = 0
    batch_size: int = 1
    caption_options: captions.CaptionOptions = captions.CaptionOptions()
    is_reg: bool = False
    loss_weight: float = 1.0  # --prior_loss_weight for regularisation images
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    augment: image_augment.AugmentOptions = image_augment.AugmentOptions()


def _name_list(paths: Sequence[Path]) -> str:
    names = [str(p) for p in paths[:_LIST_LIMIT]]
    more = len(paths) - len(names)
    return ", ".join(names) + (f" ... and {more} more" if more else "")


# ---------------------------------------------------------------- buckets and resizing


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """All (w, h) with sides in [min_reso, max_reso], multiples of `steps`, area <= resolution's area."""
    max_area = resolution[0] * resolution[1]
    buckets = set()
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, (max_area // width) // steps * steps)
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
    side = min(max_reso, math.isqrt(max_area) // steps * steps)
    if side >= min_reso:
        buckets.add((side, side))
    return sorted(buckets)


def _nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(size[0] / size[1])
    # closest aspect ratio; among equals the larger area keeps more detail
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def _no_upscale_bucket(size: tuple[int, int], bp: DatasetBlueprint) -> tuple[int, int]:
    max_area = bp.resolution[0] * bp.resolution[1]
    scale = min(1.0, math.sqrt(max_area / (size[0] * size[1])))
    steps = bp.bucket_reso_steps
    w, h = (max(steps, min(bp.max_bucket_reso, int(v * scale) // steps * steps)) for v in size)
    return w, h


def bucket_for(size: tuple[int, int], bp: DatasetBlueprint, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    if not bp.enable_bucket:
        return bp.resolution
    if bp.bucket_no_upscale:
        return _no_upscale_bucket(size, bp)
    return _nearest_bucket(size, buckets)


def resize_plan(original_size: tuple[int, int], bucket: tuple[int, int]
                ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize so the image covers the bucket (aspect kept), then center-crop: ((rw, rh), (l, t, r, b))."""
    (ow, oh), (bw, bh) = original_size, bucket
    scale = max(bw / ow, bh / oh)
    rw, rh = max(bw, round(ow * scale)), max(bh, round(oh * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


# --resize_interpolation names -> PIL filters (area: PIL's box filter, the same averaging when shrinking)
RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
              "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
              "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}


def _load_resized(item: ImageItem, mode: str) -> Image.Image:
    (rw, rh), crop = resize_plan(item.original_size, item.bucket_reso)
    try:
        with Image.open(item.image_path) as img:
            img = img.convert(mode)
            if img.size != (rw, rh):
                img = img.resize((rw, rh), RESAMPLING[item.resize_interpolation or "lanczos"])
            return img.crop(crop)
    except OSError as exc:
        raise DatasetError(f"cannot read image {item.image_path}: {exc}") from exc


def load_image_tensor(item: ImageItem, *, flip: bool = False) -> torch.Tensor:
    """The item's image resized/cropped to its bucket as float32 [3, H, W] in [-1, 1]."""
    img = _load_resized(item, "RGB")
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_alpha_mask(item: ImageItem) -> np.ndarray:
    """The alpha channel in [0, 1], resized/cropped like the image and area-averaged to latent size (bucket / 8),
    the size upstream's masked loss area-resizes it to. An image without alpha gives ones (as upstream)."""
    with Image.open(item.image_path) as probe:
        has_alpha = "A" in probe.getbands() or "transparency" in probe.info
    width, height = item.bucket_reso
    if not has_alpha:
        return np.ones((height // 8, width // 8), dtype=np.float32)
    alpha = torch.from_numpy(np.asarray(_load_resized(item, "RGBA"), dtype=np.float32)[:, :, 3].copy()) / 255.0
    small = torch.nn.functional.interpolate(alpha[None, None], size=(height // 8, width // 8), mode="area")
    return small[0, 0].numpy()


# ---------------------------------------------------------------- building items


def _read_caption(image: Path, ext: str, all_lines: bool = False) -> str | None:
    path = image.with_name(image.stem + ext)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read caption file {path} as UTF-8: {exc}") from exc
    lines = text.strip().splitlines()
    if all_lines:  # enable_wildcard: one line is chosen per step (upstream joins the non-empty lines)
        return "\n".join(line.strip() for line in lines if line.strip()) or None
    # as upstream: the first line is the caption
    return lines[0].strip() if lines else None


def _subset_items(sub: SubsetBlueprint, bp: DatasetBlueprint, ds_index: int, buckets, uncaptioned: list,
                  prior_loss_weight: float = 1.0) -> list:
    wildcard = sub.caption_options.enable_wildcard
    if sub.images is not None:  # --dataset_class: the class listed the images and their captions
        pairs = list(sub.images)
    elif sub.metadata_file is not None:  # --in_json / metadata_file: the file lists the images and their captions
        pairs = finetune_metadata.metadata_captions(sub.metadata_file, sub.image_dir,
                                                    sub.caption_options.caption_separator, wildcard, label=sub.source)
    else:
        images = sorted(p for p in sub.image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        pairs = [(path, _read_caption(path, sub.caption_extension, wildcard)) for path in images]
    items, missing = [], []
    for path, caption in pairs:
        if caption is None and sub.augment.face_crop_aug_range and sub.metadata_file is None:
            face_named = image_augment.face_caption_image(path)  # name_cx_cy_w_h.png -> name.caption
            caption = face_named and _read_caption(face_named, sub.caption_extension, wildcard)
        if caption is None:
            if not sub.class_tokens:
                missing.append(path)
                continue
            uncaptioned.append(path)
            caption = sub.class_tokens
        if sub.caption_prefix:
            caption = f"{sub.caption_prefix} {caption}"
        if sub.caption_suffix:
            caption = f"{caption} {sub.caption_suffix}"
        try:
            with Image.open(path) as img:
                size = img.size  # header only
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        if sub.caption_options.is_static:  # the same every step: process once (and cache its encoding)
            caption = captions.static_caption(caption, sub.caption_options)
        items.append(ImageItem(path, caption, bucket_for(size, bp, buckets), size, sub.flip_aug,
                               sub.num_repeats, ds_index, bp.batch_size, sub.caption_options, sub.is_reg,
                               prior_loss_weight if sub.is_reg else 1.0, sub.alpha_mask, sub.resize_interpolation,
                               dataclasses.replace(sub.augment, fixed_resolution=not bp.enable_bucket)))
    if missing:
        raise DatasetError(
            f"no caption file ({sub.caption_extension}) and no class_tokens for {len(missing)} image(s) in "
            f"{sub.source}: {_name_list(missing)}. Add caption files or set class_tokens"
        )
    return items


def balance_reg_items(items: list[ImageItem]) -> list[ImageItem]:
    """Upstream's DreamBooth rule, per dataset: regularisation images are shown exactly as often as the training
    images (with repeats) each epoch: taken in order with their repeats until that count is reached, then one more
    repeat each, round-robin. Reg images beyond the count are not used (a warning says so)."""
    result: list[ImageItem] = []
    for ds_index in sorted({item.dataset_index for item in items}):
        group = [item for item in items if item.dataset_index == ds_index]
        train = [item for item in group if not item.is_reg]
        reg = [item for item in group if item.is_reg]
        result += train
        target = sum(item.num_repeats for item in train)
        if not reg:
            continue
        if not target:
            raise DatasetError("the dataset has only regularisation images (is_reg / --reg_data_dir); add training "
                               "images")
        chosen: list[ImageItem] = []
        count = 0
        for item in reg:
            if count >= target:
                break
            chosen.append(item)
            count += item.num_repeats
        extra = [0] * len(chosen)
        k = 0
        while count < target:
            extra[k % len(chosen)] += 1
            count += 1
            k += 1
        if len(chosen) < len(reg):
            logger.warning("%d of %d regularisation images are not used: there are more of them than training "
                           "images (with repeats), as upstream", len(reg) - len(chosen), len(reg))
        result += [dataclasses.replace(item, num_repeats=item.num_repeats + n) for item, n in zip(chosen, extra)]
    return result


def build_dataset(blueprints: Sequence[DatasetBlueprint], *, seed: int, prior_loss_weight: float = 1.0
                  ) -> "TrainDataset":
    items: list[ImageItem] = []
    uncaptioned: list[Path] = []
    for ds_index, bp in enumerate(blueprints):
        buckets = []
        if bp.enable_bucket and not bp.bucket_no_upscale:
            buckets = make_buckets(bp.resolution, bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps)
            if not buckets:
                raise DatasetError(
                    f"no bucket fits resolution {bp.resolution} with min_bucket_reso {bp.min_bucket_reso} in "
                    f"{bp.source}; lower min_bucket_reso or raise resolution"
                )
        for sub in bp.subsets:
            items.extend(_subset_items(sub, bp, ds_index, buckets, uncaptioned, prior_loss_weight))
    if uncaptioned:
        logger.warning("%d image(s) have no caption file; using class_tokens for: %s",
                       len(uncaptioned), _name_list(uncaptioned))
    if not items:
        raise DatasetError("the dataset has no images")
    if any(item.is_reg for item in items):
        items = balance_reg_items(items)
    return TrainDataset(items, seed=seed)


# ---------------------------------------------------------------- the dataset


def _flip_choice(seed: int, epoch: int, index: int) -> bool:
    # a hash, not an RNG stream: the choice must not depend on which worker or in which order it is asked
    return bool(hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()[0] & 1)


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by `(epoch, item_index, repeat)` keys from `batches_for_epoch` (`(epoch, item_index)` also works)."""

    def __init__(self, items: Sequence[ImageItem], *, seed: int):
        self.items = list(items)
        self.seed = int(seed)
        self.latent_cache = None
        self.te_cache = None
        self.live_images = False  # True: no latent cache, __getitem__ gives the (augmented) image of this step
        self.augment = True  # per-step augmentation of live images; the validation part turns it off
        self._groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(self.items):
            self._groups.setdefault((item.dataset_index, item.bucket_reso), []).append(index)
        self.num_batches_per_epoch = sum(
            math.ceil(sum(self.items[i].num_repeats for i in idx) / self.items[idx[0]].batch_size)
            for idx in self._groups.values()
        )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_train_images(self) -> int:
        """Training images times repeats (regularisation images not counted, as upstream)."""
        return sum(item.num_repeats for item in self.items if not item.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(1 for item in self.items if item.is_reg)

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for item in self.items:
            counts[item.bucket_reso] = counts.get(item.bucket_reso, 0) + item.num_repeats
        return dict(sorted(counts.items()))

    def batches_for_epoch(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """Every batch of `epoch` in order, as (epoch, item, repeat) keys; a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed % 2**63, int(epoch)])
        batches = []
        for key in sorted(self._groups):  # sorted: dict order must not leak into the result
            indices = [(i, r) for i in self._groups[key] for r in range(self.items[i].num_repeats)]
            shuffled = [indices[k] for k in rng.permutation(len(indices))]
            size = self.items[indices[0][0]].batch_size
            batches += [[(epoch, i, r) for i, r in shuffled[s:s + size]] for s in range(0, len(shuffled), size)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def is_flipped(self, epoch: int, index: int) -> bool:
        return self.items[index].flip_aug and _flip_choice(self.seed, epoch, index)

    def set_caches(self, latents, te=None) -> None:
        """latents: object with `latents_for(index, flipped) -> ndarray`; te: `outputs_for(index) -> dict`."""
        self.latent_cache = latents
        self.te_cache = te

    def caption_for(self, epoch: int, index: int, occurrence: int = 0) -> str:
        """The caption of item `index` at this place of the run (library.captions; fixed when static)."""
        item = self.items[index]
        if item.caption_options.is_static:
            return item.caption
        rng = captions.caption_rng(self.seed, epoch, index, occurrence)
        return captions.process_caption(item.caption, item.caption_options, rng, epoch=epoch + 1)

    def __getitem__(self, key: tuple) -> dict:
        inject_point("dataloader")
        epoch, index, *rest = key
        if self.latent_cache is None and not self.live_images:
            raise RuntimeError("TrainDataset: latents are not cached; call caching.cache_latents and set_caches first")
        flipped = self.is_flipped(epoch, index)
        sample = {
            "index": index,
            "caption": self.caption_for(epoch, index, rest[0] if rest else 0),
            "loss_weight": self.items[index].loss_weight,
            "flipped": flipped,
        }
        if self.live_images:  # validation (augment False) gets the plain centre crop
            sample.update(image_augment.live_sample(self, epoch, index, rest[0] if rest else 0, flipped,
                                                    augment=self.augment))
        else:
            sample["latents"] = torch.from_numpy(
                np.asarray(self.latent_cache.latents_for(index, flipped), dtype=np.float32))
        alpha = getattr(self.latent_cache, "alpha_masks", {}).get(index)
        if alpha is not None:
            sample["alpha_mask"] = torch.from_numpy(np.ascontiguousarray(alpha[:, ::-1] if flipped else alpha))
        if self.te_cache is not None:
            for name, value in self.te_cache.outputs_for(index).items():
                sample[name] = torch.from_numpy(np.asarray(value))
        return sample


def collate(samples: Sequence[dict]) -> dict:
    """Stack one bucket's samples: latents [B,16,h,w] f32, captions, and the TE outputs when cached."""
    pixels = "image" in samples[0]  # per-step augmentation: the training step encodes the images
    batch = {
        "images" if pixels else "latents": torch.stack([s["image" if pixels else "latents"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "indices": [s["index"] for s in samples],
        "flipped": [s["flipped"] for s in samples],
        "loss_weights": torch.tensor([float(s.get("loss_weight", 1.0)) for s in samples]),
    }
    for name in TE_KEYS:
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if any("alpha_mask" in s for s in samples):  # a sample without one counts fully (a mask of ones)
        shape = next(s["alpha_mask"].shape for s in samples if "alpha_mask" in s)
        batch["alpha_masks"] = torch.stack([s.get("alpha_mask", torch.ones(shape)) for s in samples])
    return batch
