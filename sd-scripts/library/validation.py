"""Validation loss on a held-out part of the dataset (--validation_split and friends), as upstream.

- Split: per image folder, the images are shuffled with `random.Random(validation_seed)`; the first
  ceil(n * (1 - split)) train, the rest are held out (upstream's rule, so the same images are held out).
  A dataset's `validation_split`/`validation_seed` keys in dataset.toml win over the flags for that dataset.
- A pass: up to --max_validation_steps batches, each at the fixed timesteps 200, 400, 600, 800 (upstream's
  four evenly spaced ones), with noise drawn from a generator seeded by --validation_seed (default --seed)
  at the start of every pass. No flip, no repeats. So every pass sees the same inputs and passes are
  comparable across steps, runs and resumes.
- Cadence: --validate_every_n_steps after optimizer steps; at every epoch end unless
  --validate_every_n_epochs says otherwise (upstream). Tags: loss/validation/{step,epoch}_{average,divergence}.
- Beyond upstream: every checkpoint records the validation loss at its step (`checkpoint.json` of state
  folders, `fluxtrain_validation_loss` in LoRA metadata); `tools/find_checkpoint.py --best` ranks by it.
"""
from __future__ import annotations

import logging
import math
import random
import time
from typing import Sequence

import torch

from library import image_augment
from library.dataset import ImageItem, TrainDataset, collate
from library.settings import ValidationSettings

log = logging.getLogger(__name__)
NUM_VALIDATION_TIMESTEPS = 4
NUM_TRAIN_TIMESTEPS = 1000


def validation_timesteps(min_timestep: int = 0, max_timestep: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Upstream's fixed timesteps: NUM_VALIDATION_TIMESTEPS evenly spaced inside (min, max), ends excluded."""
    count = NUM_VALIDATION_TIMESTEPS + 2
    return [int(min_timestep + (max_timestep - min_timestep) * k / (count - 1)) for k in range(1, count - 1)]


def dataset_splits(blueprints: Sequence, settings: ValidationSettings) -> dict[int, tuple[float, int]]:
    """(split, seed) per dataset index: the dataset's validation_split/validation_seed keys of dataset.toml win
    over --validation_split/--validation_seed (default --seed), as the other dataset keys do."""
    return {index: (bp.validation_split if bp.validation_split is not None else settings.split,
                    bp.validation_seed if bp.validation_seed is not None else settings.seed)
            for index, bp in enumerate(blueprints)}


def split_indices(items: Sequence[ImageItem], split: float, seed: int,
                  per_dataset: dict[int, tuple[float, int]] | None = None) -> tuple[list[int], list[int]]:
    """(train, validation) item indices: each image folder of each dataset is split on its own, with that
    dataset's (split, seed) from `per_dataset` where given."""
    folders: dict[tuple, list[int]] = {}
    for index, item in enumerate(items):
        folders.setdefault((item.dataset_index, str(item.image_path.parent)), []).append(index)
    train, held_out = [], []
    for key in sorted(folders):
        indices = sorted(folders[key], key=lambda i: str(items[i].image_path))
        folder_split, folder_seed = (per_dataset or {}).get(key[0], (split, seed))
        random.Random(folder_seed).shuffle(indices)
        cut = math.ceil(len(indices) * (1 - folder_split))
        train += indices[:cut]
        held_out += indices[cut:]
    return sorted(train), sorted(held_out)


class SubsetDataset(TrainDataset):
    """A TrainDataset over some of the items. It keeps the full item list so that cache indices (and the
    caches, built once for all items) stay valid for both the training and the validation part."""

    def __init__(self, items: Sequence[ImageItem], indices: Sequence[int], *, seed: int, augment: bool = True):
        super().__init__(items, seed=seed)
        self.indices = sorted(indices)
        self.augment = augment
        keep = set(self.indices)
        groups = {key: [i for i in members if i in keep] for key, members in self._groups.items()}
        self._groups = {key: members for key, members in groups.items() if members}
        self.num_batches_per_epoch = sum(
            math.ceil(sum(self.items[i].num_repeats for i in members) / self.items[members[0]].batch_size)
            for members in self._groups.values())

    @property
    def num_train_images(self) -> int:
        return sum(self.items[i].num_repeats for i in self.indices if not self.items[i].is_reg)

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for i in self.indices:
            counts[self.items[i].bucket_reso] = counts.get(self.items[i].bucket_reso, 0) + self.items[i].num_repeats
        return dict(sorted(counts.items()))

    def is_flipped(self, epoch: int, index: int) -> bool:
        return self.augment and super().is_flipped(epoch, index)

    def caption_for(self, epoch: int, index: int, occurrence: int = 0) -> str:
        if self.augment:
            return super().caption_for(epoch, index, occurrence)
        from library import captions  # held-out images: no shuffle/dropout, so every pass sees the same text

        return captions.validation_caption(self.items[index].caption, self.items[index].caption_options,
                                           captions.caption_rng(self.seed, 0, index))

    def fixed_batches(self) -> list[list[tuple[int, int]]]:
        """Validation order: each image once, bucket by bucket, in file order (no shuffle, no repeats)."""
        batches = []
        for key in sorted(self._groups):
            members = self._groups[key]
            size = self.items[members[0]].batch_size
            batches += [[(0, i) for i in members[s:s + size]] for s in range(0, len(members), size)]
        return batches


def split_dataset(dataset: TrainDataset, settings: ValidationSettings, blueprints: Sequence = ()
                  ) -> tuple[TrainDataset, SubsetDataset | None]:
    """The training part and the held-out part (None without --validation_split or a validation_split key of
    the `blueprints` the dataset was built from)."""
    per_dataset = dataset_splits(blueprints, settings)
    if not settings.enabled and not any(split > 0 for split, _ in per_dataset.values()):
        if settings.every_n_steps or settings.every_n_epochs or settings.max_steps:
            log.warning("validation flags have no effect without --validation_split or a validation_split key in "
                        "the dataset config")
        return dataset, None
    train, held_out = split_indices(dataset.items, settings.split, settings.seed, per_dataset)
    if not held_out:
        splits = sorted({split for split, _ in per_dataset.values()} | {settings.split})
        log.warning("validation_split %s holds out no image (too few images per folder): validation is off",
                    "/".join(map(str, splits)))
        return dataset, None
    if not train:
        from library.settings import SettingsError

        raise SettingsError(f"--validation_split {settings.split} leaves no training image; use a smaller split")
    print(f"validation split: {len(train)} training images, {len(held_out)} held out for validation")
    return (SubsetDataset(dataset.items, train, seed=dataset.seed),
            SubsetDataset(dataset.items, held_out, seed=dataset.seed, augment=False))


class Validator:
    """Runs validation passes on the run's held-out part and remembers the loss at each step."""

    def __init__(self, session, dataset: SubsetDataset | None):
        self.s: ValidationSettings = session.settings.validation
        self.dataset = dataset
        self.timesteps = validation_timesteps()
        self.results: dict[int, float] = {}  # optimizer step -> validation loss
        self.seconds = 0.0  # time spent validating, for the benchmark
        batches = dataset.fixed_batches() if dataset is not None else []
        self.batches = batches[: self.s.max_steps] if self.s.max_steps else batches

    @property
    def enabled(self) -> bool:
        return bool(self.batches)

    def run(self, session) -> float:
        """One pass: the mean loss over the held-out batches at the fixed timesteps (no gradients)."""
        from library.flow_matching import noised_at
        from library.train_loop import flow_matching_loss

        step = session.pos.step
        if step in self.results:
            return self.results[step]
        started = time.perf_counter()
        train_ds = session.data.dataset
        self.dataset.set_caches(train_ds.latent_cache, train_ds.te_cache)
        self.dataset.live_images = train_ds.live_images  # per-step augmentation: images encoded here, unaugmented
        network = session.accelerator.unwrap_model(session.opt.network)
        network.eval()  # LoRA dropout off
        generator = torch.Generator().manual_seed(self.s.seed)
        losses = []
        with torch.no_grad():
            for keys in self.batches:
                batch = collate([self.dataset[key] for key in keys])
                latents = image_augment.batch_latents(session, batch, self.s.seed)
                for timestep in self.timesteps:
                    noise = torch.randn(latents.shape, generator=generator).to(session.device, session.weight_dtype)
                    noised = noised_at(latents, noise, timestep / NUM_TRAIN_TIMESTEPS)
                    losses.append(float(flow_matching_loss(session, batch, latents, noise, noised)))
        network.train()
        loss = sum(losses) / len(losses)
        self.results[step] = loss
        self.seconds += time.perf_counter() - started
        return loss

    def maybe_validate(self, session, control, *, at_epoch_end: bool, epoch: int | None = None) -> None:
        """The scheduled passes (upstream's cadence), logged with upstream's tags. `epoch`: the 1-based epoch
        that ends (default: the one just completed)."""
        if not self.enabled:
            return
        pos, tracker = session.pos, control.tracker
        epoch = pos.epoch if epoch is None else epoch
        if at_epoch_end:
            every = self.s.every_n_epochs
            if every and epoch % every:
                return
            kind, axis = "epoch", "epoch"
        else:
            if not self.s.every_n_steps or pos.step % self.s.every_n_steps:
                return
            kind, axis = "step", "step"
        control.set_phase("training", f"validation loss at step {pos.step}")  # monitors know no extra phase
        loss = self.run(session)
        control.set_phase("training", "training")
        if session.is_main:
            print(f"validation loss at step {pos.step}: {loss:.6f}", flush=True)
        tracker.log({f"loss/validation/{kind}_average": loss,
                     f"loss/validation/{kind}_divergence": loss - tracker.recorder.moving_average},
                    step=pos.step, epoch=epoch if at_epoch_end else pos.epoch + 1, axis=axis)

    def checkpoint_record(self, session) -> dict:
        """What a checkpoint at this step records: the validation loss at exactly this step."""
        if not self.enabled:
            return {}
        return {"validation_loss": self.run(session), "validation_step": session.pos.step,
                "validation_images": len(self.dataset.indices)}


def lora_metadata(record: dict) -> dict[str, str]:
    """LoRA file metadata for a checkpoint record (strings, like every safetensors metadata value)."""
    if not record:
        return {}
    return {"fluxtrain_validation_loss": repr(record["validation_loss"]),
            "fluxtrain_validation_step": str(record["validation_step"]),
            "ss_num_validation_images": str(record["validation_images"])}
