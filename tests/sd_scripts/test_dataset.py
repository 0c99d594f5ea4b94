"""Items and captions, buckets and cropping, deterministic/resumable batches, flips, __getitem__/collate."""

from __future__ import annotations

import logging
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset import (
    DatasetError,
    build_dataset,
    collate,
    load_image_tensor,
    make_buckets,
    resize_plan,
)
from library.dataset_config import DatasetBlueprint, SubsetBlueprint
from library.train_loop import ResumableBatchSampler


def _subset(folder: Path, **kw) -> SubsetBlueprint:
    kw.setdefault("caption_extension", ".txt")
    return SubsetBlueprint(image_dir=folder, source=f"subset {folder.name}", **kw)


def _bp(subsets, resolution=(64, 64), **kw) -> DatasetBlueprint:
    return DatasetBlueprint(subsets=tuple(subsets), resolution=resolution, source="test dataset", **kw)


def _img(path: Path, size, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


class _FakeLatents:
    """Stand-in for caching.LatentCache: index-coded latents so the test can see what was read."""

    def __init__(self, dataset):
        self.shapes = {i: (16, it.bucket_reso[1] // 8, it.bucket_reso[0] // 8) for i, it in enumerate(dataset.items)}

    def latents_for(self, index, flipped=False):
        return np.full(self.shapes[index], index + (0.5 if flipped else 0.0), dtype=np.float32)


class _FakeTE:
    def outputs_for(self, index):
        return {"l_pooled": np.full(8, index, np.float32), "t5_out": np.zeros((4, 6), np.float32),
                "txt_ids": np.zeros((4, 3), np.float32), "t5_attn_mask": np.ones(4, np.int64)}


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Six images in three aspect ratios."""
    folder = tmp_path / "mixed"
    for i in range(2):
        _img(folder / f"wide{i}.png", (160, 80))
        _img(folder / f"tall{i}.jpg", (80, 160))
        _img(folder / f"square{i}.webp", (100, 100))
    return folder


def test_captions_from_files_class_tokens_prefix_suffix(tmp_path, caplog):
    folder = tmp_path / "d"
    for name in ("a", "b", "c"):
        _img(folder / f"{name}.png", (64, 64))
    (folder / "a.txt").write_text("\ufeff  Zoë's ✨ caption  \nsecond line\n", encoding="utf-8")
    (folder / "b.txt").write_text("plain", encoding="utf-8")
    (folder / "notes.md").write_text("ignored")
    sub = _subset(folder, class_tokens="sks cat", caption_prefix="photo of", caption_suffix="high quality")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset([_bp([sub])], seed=0)
    assert [i.image_path.name for i in ds.items] == ["a.png", "b.png", "c.png"]
    assert [i.caption for i in ds.items] == [
        "photo of Zoë's ✨ caption high quality",
        "photo of plain high quality",
        "photo of sks cat high quality",
    ]
    warnings = [r for r in caplog.records if "no caption file" in r.getMessage()]
    assert len(warnings) == 1 and "c.png" in warnings[0].getMessage() and "a.png" not in warnings[0].getMessage()


def test_missing_captions_without_class_tokens_is_an_error(tmp_path):
    folder = tmp_path / "d"
    _img(folder / "x.png", (64, 64))
    with pytest.raises(DatasetError, match="x.png") as info:
        build_dataset([_bp([_subset(folder)])], seed=0)
    assert "class_tokens" in str(info.value) and "subset d" in str(info.value)


def test_fixed_resolution_covers_and_center_crops(tmp_path):
    path = tmp_path / "d" / "stripe.png"
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, 32:96] = 255  # white center band exactly as wide as the crop
    path.parent.mkdir()
    Image.fromarray(pixels).save(path)
    ds = build_dataset([_bp([_subset(path.parent, class_tokens="x")], resolution=(64, 64))], seed=0)
    (item,) = ds.items
    assert item.bucket_reso == (64, 64) and item.original_size == (128, 64)
    assert resize_plan(item.original_size, item.bucket_reso) == ((128, 64), (32, 0, 96, 64))
    image = load_image_tensor(item)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert torch.allclose(image, torch.ones_like(image), atol=1e-6)  # only the white band survives
    flipped = load_image_tensor(item, flip=True)
    assert torch.equal(flipped, image.flip(-1))


def test_small_image_is_upscaled_to_cover(tmp_path):
    path = _img(tmp_path / "d" / "s.png", (40, 30), (0, 0, 255))
    ds = build_dataset([_bp([_subset(path.parent, class_tokens="x")], resolution=(64, 48))], seed=0)
    image = load_image_tensor(ds.items[0])
    assert image.shape == (3, 48, 64)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert torch.allclose(image[2], torch.ones(48, 64), atol=1e-2) and torch.allclose(image[0], -torch.ones(48, 64))


def test_make_buckets_properties():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
        assert 256 <= w <= 1024 and 256 <= h <= 1024
    assert make_buckets((128, 128), 256, 1024, 64) == []


def test_bucketing_picks_matching_aspect(mixed):
    bp = _bp([_subset(mixed, class_tokens="x")], resolution=(128, 128), enable_bucket=True, min_bucket_reso=64,
             max_bucket_reso=256)
    ds = build_dataset([bp], seed=0)
    by_name = {i.image_path.stem: i.bucket_reso for i in ds.items}
    assert by_name["wide0"] == (192, 64)  # 3:1 is the closest to 2:1 with area <= 128*128 in 64 px steps
    assert by_name["tall1"] == (64, 192)
    assert by_name["square0"] == (128, 128)
    for item in ds.items:
        assert all(v % 16 == 0 for v in item.bucket_reso)
        assert load_image_tensor(item).shape == (3, item.bucket_reso[1], item.bucket_reso[0])
    assert ds.bucket_counts == {(64, 192): 2, (128, 128): 2, (192, 64): 2}


def test_bucket_no_upscale(tmp_path):
    folder = tmp_path / "d"
    _img(folder / "small.png", (200, 130))
    _img(folder / "big.png", (1000, 500))
    bp = _bp([_subset(folder, class_tokens="x")], resolution=(256, 256), enable_bucket=True, min_bucket_reso=64,
             max_bucket_reso=1024, bucket_no_upscale=True)
    ds = build_dataset([bp], seed=0)
    sizes = {i.image_path.stem: i.bucket_reso for i in ds.items}
    assert sizes["small"] == (192, 128)  # rounded down to 64 px steps, never up
    w, h = sizes["big"]
    assert w * h <= 256 * 256 and w > h and w % 64 == 0 and h % 64 == 0


def _two_subsets(tmp_path, mixed) -> list:
    other = tmp_path / "other"
    for i in range(3):
        _img(other / f"o{i}.png", (64, 64))
    return [
        _bp([_subset(mixed, class_tokens="m", num_repeats=3, flip_aug=True)], resolution=(128, 128),
            enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, batch_size=2),
        _bp([_subset(other, class_tokens="o", num_repeats=2)], resolution=(64, 64), batch_size=4),
    ]


def test_batches_deterministic_complete_and_single_bucket(tmp_path, mixed):
    ds = build_dataset(_two_subsets(tmp_path, mixed), seed=123)
    again = build_dataset(_two_subsets(tmp_path, mixed), seed=123)
    other_seed = build_dataset(_two_subsets(tmp_path, mixed), seed=124)
    e0, e1 = ds.batches_for_epoch(0), ds.batches_for_epoch(1)
    assert e0 == again.batches_for_epoch(0) and e1 == again.batches_for_epoch(1)
    assert e0 != e1 and e0 != other_seed.batches_for_epoch(0)
    for epoch, batches in ((0, e0), (1, e1)):
        assert len(batches) == ds.num_batches_per_epoch
        counts = Counter(idx for batch in batches for ep, idx, *_ in batch if ep == epoch)
        assert counts == {i: it.num_repeats for i, it in enumerate(ds.items)}  # repeats, nothing lost
        for batch in batches:
            buckets = {(ds.items[i].dataset_index, ds.items[i].bucket_reso) for _, i, *_ in batch}
            assert len(buckets) == 1 and len(batch) <= ds.items[batch[0][1]].batch_size
    assert ds.num_train_images == 6 * 3 + 3 * 2
    # 3 buckets x 6 samples / bs 2 = 9, plus ceil(6 / 4) = 2
    assert ds.num_batches_per_epoch == 11


def test_resume_mid_epoch_is_the_tail_of_the_full_epoch(tmp_path, mixed):
    ds = build_dataset(_two_subsets(tmp_path, mixed), seed=7)
    ds.set_caches(_FakeLatents(ds))
    full = ds.batches_for_epoch(2)

    def sampler(start: int, num_epochs: int = 3) -> ResumableBatchSampler:
        return ResumableBatchSampler(ds, start_epoch=2, start_batch=start, num_epochs=num_epochs, rank=0, world=1,
                                     batches_per_epoch=len(full))

    assert list(sampler(0)) == full
    for start in (0, 1, 5, len(full)):
        assert len(sampler(start)) == len(full) - start
        assert list(sampler(start)) == full[start:]
    # the cursor crosses into the next epoch with that epoch's own order
    assert list(sampler(5, num_epochs=4)) == full[5:] + ds.batches_for_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler(4), collate_fn=collate)
    assert [b["indices"] for b in loader] == [[i for _, i, *_ in batch] for batch in full[4:]]


def test_flip_choice_deterministic_and_read_from_cache(tmp_path, mixed):
    ds = build_dataset(_two_subsets(tmp_path, mixed), seed=5)
    ds.set_caches(_FakeLatents(ds), _FakeTE())
    flippable = [i for i, it in enumerate(ds.items) if it.flip_aug]
    fixed = [i for i, it in enumerate(ds.items) if not it.flip_aug]
    choices = {(e, i): ds.is_flipped(e, i) for e in range(6) for i in flippable}
    again = build_dataset(_two_subsets(tmp_path, mixed), seed=5)
    assert choices == {(e, i): again.is_flipped(e, i) for e in range(6) for i in flippable}
    assert 0 < sum(choices.values()) < len(choices)  # both orientations get used
    assert not any(ds.is_flipped(e, i) for e in range(6) for i in fixed)
    for (epoch, index), flipped in choices.items():
        sample = ds[(epoch, index)]
        assert sample["flipped"] == flipped
        assert float(sample["latents"][0, 0, 0]) == index + (0.5 if flipped else 0.0)


def test_getitem_and_collate_shapes(tmp_path, mixed):
    ds = build_dataset(_two_subsets(tmp_path, mixed), seed=0)
    with pytest.raises(RuntimeError, match="set_caches"):
        ds[(0, 0)]
    ds.set_caches(_FakeLatents(ds), _FakeTE())
    batch_keys = ds.batches_for_epoch(0)[0]
    batch = collate([ds[k] for k in batch_keys])
    first = ds.items[batch_keys[0][1]]
    assert batch["latents"].shape == (len(batch_keys), 16, first.bucket_reso[1] // 8, first.bucket_reso[0] // 8)
    assert batch["latents"].dtype == torch.float32
    assert batch["captions"] == [ds.items[i].caption for _, i, *_ in batch_keys]
    assert batch["l_pooled"].shape == (len(batch_keys), 8) and batch["t5_attn_mask"].dtype == torch.int64
    assert batch["t5_out"].shape == (len(batch_keys), 4, 6) and batch["txt_ids"].shape == (len(batch_keys), 4, 3)
    ds.set_caches(_FakeLatents(ds), None)
    assert "l_pooled" not in collate([ds[k] for k in batch_keys])


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="interval timers are POSIX only")
def test_getitem_honours_injected_dataloader_hang(tmp_path, mixed, monkeypatch):
    ds = build_dataset(_two_subsets(tmp_path, mixed), seed=0)
    ds.set_caches(_FakeLatents(ds))
    monkeypatch.setenv("FLUXTRAIN_INJECT_HANG", "dataloader")

    class _Stuck(Exception):
        pass

    def _raise(*_):
        raise _Stuck()

    previous = signal.signal(signal.SIGALRM, _raise)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with pytest.raises(_Stuck):  # still blocked after 0.6 s: the injection point is inside __getitem__
            ds[(0, 0)]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    monkeypatch.delenv("FLUXTRAIN_INJECT_HANG")
    assert ds[(0, 0)]["index"] == 0


def test_corrupt_image_is_named(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png"):
        build_dataset([_bp([_subset(folder, class_tokens="x")])], seed=0)
