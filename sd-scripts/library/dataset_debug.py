"""`--debug_dataset`: print the dataset as training would see it, then stop (upstream's meaning).

Nothing heavy runs: no model, tokenizer or cache is loaded, the output folder is not touched (no lock, no
run record). Per item it prints the image path, the caption as epoch 1 would use it (caption options applied,
first repeat), the bucket resolution and the repeats; then the totals. Upstream also opens an image window
per batch; this is a console tool, so the listing is text only.
"""
from __future__ import annotations

from typing import Callable

from library.settings import TrainSettings, total_steps


def dataset_lines(settings: TrainSettings) -> list[str]:
    """The listing, built from the same blueprints, split and order rules the trainer uses."""
    from library import dataset, validation
    from library.preflight import load_blueprints

    blueprints = load_blueprints(settings)
    data = dataset.build_dataset(blueprints, seed=settings.run.seed, prior_loss_weight=settings.data.prior_loss_weight)
    train, held_out = validation.split_dataset(data, settings.validation, blueprints)
    lines = []
    indices = list(getattr(train, "indices", range(len(train.items))))  # a SubsetDataset keeps all items
    for index in indices:
        item = train.items[index]
        w, h = item.bucket_reso
        kind = " (regularisation image, loss weight %g)" % item.loss_weight if item.is_reg else ""
        lines += [f"[{index}] image: {item.image_path}{kind}",
                  f"    caption (epoch 1): {train.caption_for(0, index)}",
                  f"    bucket: {w}x{h}  repeats: {item.num_repeats}"]
    steps, epochs = total_steps(settings.run.max_train_steps, settings.run.max_train_epochs,
                                train.num_batches_per_epoch)
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in train.bucket_counts.items())
    reg = sum(1 for i in indices if train.items[i].is_reg)
    lines += [f"images: {len(indices)} ({train.num_train_images} training images x repeats, {reg} "
              f"regularisation), held out for validation: {len(held_out.indices) if held_out is not None else 0}",
              f"buckets (images x repeats): {buckets}",
              f"batches per epoch: {train.num_batches_per_epoch}; {steps} steps = {epochs} epoch(s)"]
    return lines


def show_dataset(settings: TrainSettings, out: Callable[[str], None] = print) -> int:
    """Print the listing; exit code 0 (bad dataset input raises the usual errors before anything prints)."""
    for line in dataset_lines(settings):
        out(line)
    out("--debug_dataset: dataset shown; nothing was trained")
    return 0
