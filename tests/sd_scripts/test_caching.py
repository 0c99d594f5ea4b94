"""Latent / TE caches: upstream names and keys, reuse, staleness, damage, memory mode, bounded reads."""

from __future__ import annotations

import io
import logging
import os
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library import caching
from library.caching import (
    FINGERPRINT_KEY,
    LatentCache,
    cache_latents,
    cache_text_encoder_outputs,
    file_identity,
    latent_cache_path,
    te_cache_path,
)
from library.dataset import build_dataset, collate
from library.dataset_config import DatasetBlueprint, SubsetBlueprint
from library.npz_io import CacheReadTimeout, atomic_savez

TE_LEN, TE_DIM, CLIP_DIM = 6, 4, 8


class CountingEncoder:
    """Stand-in AE: 8x average pool, channels tiled to 16; remembers how many images it encoded."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += images.shape[0]
        return F.avg_pool2d(images, 8).repeat(1, 6, 1, 1)[:, :16]


class CountingTE:
    """Stand-in text encoder: caption length drives the values; bf16 t5_out like a real bf16 T5."""

    def __init__(self):
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> dict:
        self.captions += captions
        lengths = torch.tensor([float(len(c)) for c in captions])
        b = len(captions)
        return {
            "l_pooled": lengths[:, None].repeat(1, CLIP_DIM),
            "t5_out": lengths[:, None, None].repeat(1, TE_LEN, TE_DIM).to(torch.bfloat16),
            "txt_ids": torch.zeros(b, TE_LEN, 3),
            "t5_attn_mask": torch.ones(b, TE_LEN, dtype=torch.int64),
        }


def _dataset(folder: Path, *, flip=False, resolution=(64, 64), seed=0, extra: list | None = None):
    sub = SubsetBlueprint(image_dir=folder, caption_extension=".txt", class_tokens="sks", flip_aug=flip)
    blueprints = [DatasetBlueprint(subsets=(sub,), resolution=resolution)] + (extra or [])
    return build_dataset(blueprints, seed=seed)


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(80, 64), (64, 64), (64, 96)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption number {i}", encoding="utf-8")
    return folder


def test_cache_file_names_are_upstream():
    assert latent_cache_path(Path("/d/my.image.png"), (832, 1216)) == Path("/d/my.image_0832x1216_flux.npz")
    assert te_cache_path(Path("/d/my.image.jpg")) == Path("/d/my.image_flux_te.npz")


def test_latent_keys_exactly_upstream_plus_fingerprint(folder, capsys):
    ds = _dataset(folder, flip=True)
    enc = CountingEncoder()
    cache = cache_latents(ds, enc, to_disk=True, batch_size=2, io_timeout=5, progress=False)
    assert "caching latents..." in capsys.readouterr().out
    assert enc.seen == 2 * len(ds.items)  # plain + flipped
    item = ds.items[0]
    path = latent_cache_path(item.image_path, item.original_size)
    assert path.name == "img0_0080x0064_flux.npz"
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"latents_8x8", "latents_flipped_8x8", "original_size_8x8", "crop_ltrb_8x8",
                                  f"{FINGERPRINT_KEY}_8x8"}
        assert npz["latents_8x8"].shape == (16, 8, 8) and npz["latents_8x8"].dtype == np.float32
        assert npz["original_size_8x8"].tolist() == [80, 64]
        assert npz["crop_ltrb_8x8"].tolist() == [8, 0, 72, 64]
        assert len(str(npz[f"{FINGERPRINT_KEY}_8x8"])) == 64
        flipped = npz["latents_flipped_8x8"]
        np.testing.assert_allclose(flipped, npz["latents_8x8"][:, :, ::-1], atol=1e-5)
    np.testing.assert_array_equal(cache.latents_for(0, flipped=True), flipped)
    assert not list(folder.glob(".*tmp*"))


def test_te_keys_exactly_upstream_plus_fingerprint(folder, capsys):
    ds = _dataset(folder)
    te = CountingTE()
    cache = cache_text_encoder_outputs(ds, te, to_disk=True, fingerprint="clip:1|t5:2", apply_t5_attn_mask=True,
                                       batch_size=2, io_timeout=5, t5_max_length=TE_LEN, progress=False)
    assert "caching Text Encoder outputs..." in capsys.readouterr().out
    assert sorted(te.captions) == sorted(i.caption for i in ds.items)
    with np.load(te_cache_path(ds.items[1].image_path), allow_pickle=False) as npz:
        assert set(npz.files) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask",
                                  FINGERPRINT_KEY}
        assert npz["t5_out"].dtype == np.float32 and npz["t5_out"].shape == (TE_LEN, TE_DIM)  # bf16 -> f32
        assert npz["l_pooled"].shape == (CLIP_DIM,) and npz["t5_attn_mask"].dtype == np.int64
        assert npz["apply_t5_attn_mask"].shape == () and bool(npz["apply_t5_attn_mask"]) is True
    out = cache.outputs_for(1)
    assert set(out) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask"}
    assert float(out["l_pooled"][0]) == len(ds.items[1].caption)


def test_valid_files_are_reused(folder):
    ds = _dataset(folder)
    cache_latents(ds, CountingEncoder(), to_disk=True, batch_size=4, io_timeout=5, progress=False)
    cache_text_encoder_outputs(ds, CountingTE(), to_disk=True, fingerprint="f", apply_t5_attn_mask=False,
                               io_timeout=5, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    enc, te = CountingEncoder(), CountingTE()
    latents = cache_latents(_dataset(folder), enc, to_disk=True, batch_size=4, io_timeout=5, progress=False)
    cache_text_encoder_outputs(_dataset(folder), te, to_disk=True, fingerprint="f", apply_t5_attn_mask=False,
                               io_timeout=5, progress=False)
    assert enc.seen == 0 and te.captions == []
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.npz")} == mtimes
    assert latents.latents_for(2).shape == (16, 8, 8) and not latents.memory


def test_stale_caption_is_recached_with_warning(folder, caplog):
    ds = _dataset(folder)
    cache_text_encoder_outputs(ds, CountingTE(), to_disk=True, fingerprint="f", apply_t5_attn_mask=False,
                               io_timeout=5, progress=False)
    (folder / "img1.txt").write_text("a much longer edited caption", encoding="utf-8")
    te = CountingTE()
    with caplog.at_level(logging.WARNING):
        cache = cache_text_encoder_outputs(_dataset(folder), te, to_disk=True, fingerprint="f",
                                           apply_t5_attn_mask=False, io_timeout=5, progress=False)
    assert te.captions == ["a much longer edited caption"]
    stale = te_cache_path(folder / "img1.png")
    assert str(stale) in caplog.text and "stale" in caplog.text
    assert float(cache.outputs_for(1)["l_pooled"][0]) == len("a much longer edited caption")


@pytest.mark.parametrize("change", ["encoder", "max_length", "apply_mask"])
def test_te_settings_change_recaches(folder, change):
    base = dict(fingerprint="enc-a", apply_t5_attn_mask=False, t5_max_length=TE_LEN)
    cache_text_encoder_outputs(_dataset(folder), CountingTE(), to_disk=True, io_timeout=5, progress=False, **base)
    changed = {**base, **{"encoder": {"fingerprint": "enc-b"}, "max_length": {"t5_max_length": 512},
                          "apply_mask": {"apply_t5_attn_mask": True}}[change]}
    te = CountingTE()
    cache_text_encoder_outputs(_dataset(folder), te, to_disk=True, io_timeout=5, progress=False, **changed)
    assert len(te.captions) == 3


def test_changed_image_content_recaches_latents(folder, caplog):
    cache_latents(_dataset(folder), CountingEncoder(), to_disk=True, batch_size=1, io_timeout=5, progress=False)
    Image.new("RGB", (80, 64), (0, 255, 0)).save(folder / "img0.png")  # same size, new pixels
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        cache = cache_latents(_dataset(folder), enc, to_disk=True, batch_size=1, io_timeout=5, progress=False)
    assert enc.seen == 1
    assert "img0_0080x0064_flux.npz" in caplog.text and "changed" in caplog.text
    green = cache.latents_for(0)
    assert np.allclose(green[1], 1.0) and np.allclose(green[0], -1.0)  # channel tiling of R, G, B


def test_upstream_file_without_fingerprint_is_stale(folder, caplog):
    ds = _dataset(folder)
    item = ds.items[0]
    path = latent_cache_path(item.image_path, item.original_size)
    atomic_savez(path, {"latents_8x8": np.zeros((16, 8, 8), np.float32), "original_size_8x8": np.array([80, 64]),
                        "crop_ltrb_8x8": np.array([8, 0, 72, 64])})
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        cache_latents(ds, enc, to_disk=True, batch_size=1, io_timeout=5, progress=False)
    assert enc.seen == 3 and str(path) in caplog.text and "no fingerprint" in caplog.text
    with np.load(path) as npz:
        assert f"{FINGERPRINT_KEY}_8x8" in npz.files and npz["latents_8x8"].any()


def _damage(data: bytes, how: str) -> bytes:
    if how == "bitflip":  # zip directory intact, array bytes wrong: only the member CRC can tell
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = zf.infolist()[0]
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        spot = info.header_offset + 30 + name_len + extra_len + info.file_size - 1  # last byte of the array
        return data[:spot] + bytes([data[spot] ^ 0xFF]) + data[spot + 1:]
    return {"truncated": data[: len(data) * 2 // 3], "garbage": b"\0" * len(data), "empty": b""}[how]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bitflip"])
def test_damaged_files_are_remade(folder, caplog, damage):
    ds = _dataset(folder)
    cache_latents(ds, CountingEncoder(), to_disk=True, batch_size=1, io_timeout=5, progress=False)
    cache_text_encoder_outputs(ds, CountingTE(), to_disk=True, fingerprint="f", apply_t5_attn_mask=False,
                               io_timeout=5, progress=False)
    lat = latent_cache_path(ds.items[2].image_path, ds.items[2].original_size)
    te_file = te_cache_path(ds.items[2].image_path)
    for path in (lat, te_file):
        data = path.read_bytes()
        path.write_bytes(_damage(data, damage))
    enc, te = CountingEncoder(), CountingTE()
    with caplog.at_level(logging.WARNING):
        latents = cache_latents(_dataset(folder), enc, to_disk=True, batch_size=1, io_timeout=5, progress=False)
        outputs = cache_text_encoder_outputs(_dataset(folder), te, to_disk=True, fingerprint="f",
                                             apply_t5_attn_mask=False, io_timeout=5, progress=False)
    assert enc.seen == 1 and te.captions == ["caption number 2"]
    assert str(lat) in caplog.text and str(te_file) in caplog.text
    assert latents.latents_for(2).shape == (16, 8, 8) and outputs.outputs_for(2)["t5_out"].shape == (TE_LEN, TE_DIM)


def test_memory_mode_writes_nothing(folder):
    ds = _dataset(folder, flip=True)
    latents = cache_latents(ds, CountingEncoder(), to_disk=False, batch_size=3, io_timeout=5, progress=False)
    te = cache_text_encoder_outputs(ds, CountingTE(), to_disk=False, fingerprint="f", apply_t5_attn_mask=False,
                                    io_timeout=5, progress=False)
    assert not list(folder.glob("*.npz")) and not latents.disk and not te.disk
    ds.set_caches(latents, te)
    batch = collate([ds[k] for k in ds.batches_for_epoch(0)[0]])
    assert batch["latents"].shape[1] == 16 and batch["t5_out"].dtype == torch.float32


def test_two_resolutions_share_one_file(folder, tmp_path):
    second = DatasetBlueprint(subsets=(SubsetBlueprint(image_dir=folder, caption_extension=".txt"),),
                              resolution=(128, 128))
    ds = _dataset(folder, extra=[second])
    enc = CountingEncoder()
    cache_latents(ds, enc, to_disk=True, batch_size=2, io_timeout=5, progress=False)
    assert enc.seen == 6
    with np.load(folder / "img1_0064x0064_flux.npz") as npz:
        assert {"latents_8x8", "latents_16x16"} <= set(npz.files)
    enc2 = CountingEncoder()
    cache_latents(_dataset(folder, extra=[second]), enc2, to_disk=True, batch_size=2, io_timeout=5, progress=False)
    assert enc2.seen == 0


def test_killed_writer_leftover_is_ignored_and_removed(folder):
    ds = _dataset(folder)
    item = ds.items[0]
    final = latent_cache_path(item.image_path, item.original_size)
    leftover = final.with_name(f".{final.name}.tmp-99999999-deadbeef")
    leftover.write_bytes(b"PK\x03\x04half written")
    enc = CountingEncoder()
    cache_latents(ds, enc, to_disk=True, batch_size=1, io_timeout=5, progress=False)
    assert enc.seen == 3 and not leftover.exists() and final.exists()


def test_file_identity_tracks_content_not_name(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    payload = os.urandom(3 << 20)
    a.write_bytes(payload)
    b.write_bytes(payload)
    assert file_identity(a) == file_identity(b)
    b.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    assert file_identity(a) != file_identity(b)
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert file_identity(folder) != file_identity(a)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX only")
def test_dataloader_worker_over_fifo_cache_raises_within_timeout(folder):
    ds = _dataset(folder)
    fifo = folder / "img0_0080x0064_flux.npz"
    os.mkfifo(fifo)
    stalled = LatentCache(io_timeout=0.5, disk={i: (fifo, "_8x8") for i in range(len(ds.items))})
    ds.set_caches(stalled)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.batches_for_epoch(0), collate_fn=collate,
                                         num_workers=1, timeout=60)
    start = time.monotonic()
    try:
        with pytest.raises(CacheReadTimeout) as info:
            next(iter(loader))
        assert time.monotonic() - start < 20  # worker start-up included; the bound itself is 0.5 s
        assert "--cache_io_timeout" in str(info.value) and str(fifo) in str(info.value)
    finally:
        try:  # give the worker's blocked reader its EOF
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_inject_cache_io_hang_bounds_validation_read(folder, monkeypatch):
    ds = _dataset(folder)
    cache_latents(ds, CountingEncoder(), to_disk=True, batch_size=1, io_timeout=5, progress=False)
    monkeypatch.setenv("FLUXTRAIN_INJECT_HANG", "cache_io")
    start = time.monotonic()
    with pytest.raises(CacheReadTimeout):  # a stalled disk is not "damaged": it must not be re-made silently
        cache_latents(_dataset(folder), CountingEncoder(), to_disk=True, batch_size=1, io_timeout=0.4,
                      progress=False)
    assert time.monotonic() - start < 3
    assert caching.FINGERPRINT_KEY == "fluxtrain_fingerprint"
