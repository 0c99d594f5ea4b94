"""Data options: regularisation images and their balancing, --prior_loss_weight, alpha masks, resize
interpolation and --dataset_repeats, each checked by its effect on items, tensors or caches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset import build_dataset, collate, load_alpha_mask, load_image_tensor
from library.dataset_config import (DatasetConfigError, blueprints_from_train_data_dir, check_masked_loss,
                                    load_dataset_config)


def _images(folder, count, size=(32, 32), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, (40 * i % 255, 90, 30) + ((255,) if mode == "RGBA" else ())).save(folder / f"{i}.png")
    return folder


class FakeLatents:
    """What caching.cache_latents provides to the dataset (zeros; alpha masks when given)."""

    def __init__(self, alpha_masks=None):
        self.alpha_masks = alpha_masks or {}

    def latents_for(self, index, flipped=False):
        return np.zeros((16, 4, 4), dtype=np.float32)


def _toml(tmp_path, body: str):
    path = tmp_path / "d.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_reg_images_are_balanced_to_the_training_count_and_weighted(tmp_path):
    _images(tmp_path / "train" / "3_tok", 2)
    _images(tmp_path / "reg" / "1_person", 4)
    bps = blueprints_from_train_data_dir(tmp_path / "train", cli={"resolution": (32, 32)},
                                         reg_data_dir=tmp_path / "reg")
    assert [s.is_reg for s in bps[0].subsets] == [False, True]
    ds = build_dataset(bps, seed=1, prior_loss_weight=0.25)
    regs = [it for it in ds.items if it.is_reg]
    assert [it.num_repeats for it in regs] == [2, 2, 1, 1]  # 6 training views -> 6 reg views, round-robin
    assert all(it.loss_weight == 0.25 and it.caption == "person" for it in regs)
    assert ds.num_train_images == 6 and ds.num_reg_images == 4
    assert ds.num_batches_per_epoch == 12
    ds.set_caches(FakeLatents())
    batch = collate([ds[key] for batch in ds.batches_for_epoch(0) for key in batch])
    assert sorted(batch["loss_weights"].tolist()) == [0.25] * 6 + [1.0] * 6


def test_surplus_reg_images_are_left_out_with_a_warning(tmp_path, caplog):
    _images(tmp_path / "train" / "1_tok", 2)
    _images(tmp_path / "reg" / "1_person", 5)
    bps = blueprints_from_train_data_dir(tmp_path / "train", cli={"resolution": (32, 32)},
                                         reg_data_dir=tmp_path / "reg")
    ds = build_dataset(bps, seed=1)
    assert sum(it.is_reg for it in ds.items) == 2 and "3 of 5 regularisation images are not used" in caplog.text


def test_is_reg_subset_key_and_dataset_repeats_fallback(tmp_path):
    train = _images(tmp_path / "train", 2)
    reg = _images(tmp_path / "reg", 2)
    toml = _toml(tmp_path, f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = '{train}'\n"
                           f"class_tokens = 'tok'\n[[datasets.subsets]]\nimage_dir = '{reg}'\nis_reg = true\n"
                           "class_tokens = 'person'\nnum_repeats = 1\n")
    (bp,) = load_dataset_config(toml, cli={"dataset_repeats": 3})
    assert [(s.num_repeats, s.is_reg) for s in bp.subsets] == [(3, False), (1, True)]


def test_alpha_mask_at_latent_size_flipped_with_the_image(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :, :3] = 120
    rgba[:, :16, 3] = 255  # left half opaque
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "b.png")
    toml = _toml(tmp_path, f"[general]\nflip_aug = true\n[[datasets]]\nresolution = 32\nbatch_size = 2\n"
                           f"[[datasets.subsets]]\nimage_dir = '{folder}'\nclass_tokens = 'tok'\nalpha_mask = true\n")
    blueprints = load_dataset_config(toml, cli={})
    ds = build_dataset(blueprints, seed=0)
    mask = load_alpha_mask(ds.items[0])
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[:, :2] = 1.0
    assert np.array_equal(mask, expected)
    assert np.array_equal(load_alpha_mask(ds.items[1]), np.ones((4, 4), dtype=np.float32))  # no alpha: ones

    from library.caching import cache_latents

    cache = cache_latents(ds, lambda imgs: torch.zeros(imgs.shape[0], 16, 4, 4), to_disk=False, progress=False)
    assert set(cache.alpha_masks) == {0, 1} and np.array_equal(cache.alpha_masks[0], expected)
    ds.set_caches(FakeLatents({0: mask}))
    flipped_epoch = next(e for e in range(20) if ds.is_flipped(e, 0))
    sample = ds[(flipped_epoch, 0, 0)]
    assert torch.equal(sample["alpha_mask"], torch.from_numpy(expected[:, ::-1].copy()))
    batch = collate([ds[(0, 0, 0)], ds[(0, 1, 0)]])
    assert batch["alpha_masks"].shape == (2, 4, 4) and float(batch["alpha_masks"][1].min()) == 1.0
    check_masked_loss(blueprints, masked_loss=True)  # alpha masks exist: fine
    plain = load_dataset_config(_toml(tmp_path, f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n"
                                                f"image_dir = '{folder}'\nclass_tokens = 'tok'\n"), cli={})
    with pytest.raises(DatasetConfigError, match="--masked_loss needs alpha masks"):
        check_masked_loss(plain, masked_loss=True)


def test_resize_interpolation_changes_the_pixels_and_the_cache_fingerprint(tmp_path):
    from library.caching import _image_fingerprint

    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "n.png")
    body = f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = '{folder}'\nclass_tokens = 't'\n"
    lanczos = build_dataset(load_dataset_config(_toml(tmp_path, body), cli={}), seed=0).items[0]
    nearest = build_dataset(load_dataset_config(_toml(tmp_path, body), cli={"resize_interpolation": "nearest"}),
                            seed=0).items[0]
    assert nearest.resize_interpolation == "nearest" and lanczos.resize_interpolation is None
    with Image.open(folder / "n.png") as img:
        ref = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.NEAREST), dtype=np.float32)
    assert torch.equal(load_image_tensor(nearest), (torch.from_numpy(ref.copy()) / 127.5 - 1.0).permute(2, 0, 1))
    assert not torch.equal(load_image_tensor(nearest), load_image_tensor(lanczos))
    assert _image_fingerprint(nearest, "e") != _image_fingerprint(lanczos, "e")


def test_debug_dataset_lists_items_and_exits_without_models_or_output(tmp_path, capsys):
    """--debug_dataset: each image with its epoch-1 caption, bucket and repeats, exit 0; the model paths do not
    exist and the output folder is never created, so nothing was loaded, locked or written."""
    from train_helpers import run_trainer_in_process

    folder = _images(tmp_path / "data" / "3_tok", 2, size=(64, 96))
    (folder / "0.txt").write_text("a red square", encoding="utf-8")
    out = tmp_path / "out"
    rc = run_trainer_in_process([
        "--pretrained_model_name_or_path", str(tmp_path / "missing.sft"), "--clip_l", "/missing/c", "--t5xxl",
        "/missing/t", "--ae", "/missing/a", "--train_data_dir", str(tmp_path / "data"), "--resolution", "64",
        "--caption_extension", ".txt", "--caption_prefix", "photo of", "--output_dir", str(out), "--debug_dataset"])
    text = capsys.readouterr().out
    assert rc == 0 and not out.exists()
    assert f"image: {folder / '0.png'}\n    caption (epoch 1): photo of a red square\n    bucket: 64x64  repeats: 3" in text
    assert f"image: {folder / '1.png'}\n    caption (epoch 1): photo of tok\n" in text  # no caption file: class tokens
    assert "batches per epoch: 6" in text and "nothing was trained" in text


def test_in_json_captions_come_from_the_metadata_file(tmp_path, capsys):
    """--in_json with --train_data_dir (upstream's fine-tuning layout): keys name images by path, by name in the
    folder, or by name without extension; caption + caption_separator + tags, tags alone, or empty; caption
    files beside the images are not read; --dataset_repeats sets the repeats. Shown through --debug_dataset."""
    import json

    from train_helpers import run_trainer_in_process

    folder = tmp_path / "imgs"
    _images(folder, 3, size=(64, 64))
    (folder / "0.txt").write_text("from the caption file", encoding="utf-8")
    meta = {"0": {"caption": "a cat", "tags": "tag1, tag2"}, str(folder / "1.png"): {"tags": "solo, red"},
            "2.png": {"train_resolution": [64, 64]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    base = ["--pretrained_model_name_or_path", "/missing/f", "--clip_l", "/missing/c", "--t5xxl", "/missing/t",
            "--ae", "/missing/a", "--train_data_dir", str(folder), "--resolution", "64", "--caption_extension",
            ".txt", "--output_dir", str(tmp_path / "out"), "--debug_dataset", "--dataset_repeats", "2"]
    assert run_trainer_in_process(base + ["--in_json", str(tmp_path / "meta.json")]) == 0
    text = capsys.readouterr().out
    assert f"image: {folder / '0.png'}\n    caption (epoch 1): a cat,tag1, tag2\n    bucket: 64x64  repeats: 2" in text
    assert f"image: {folder / '1.png'}\n    caption (epoch 1): solo, red\n" in text
    assert f"image: {folder / '2.png'}\n    caption (epoch 1): \n" in text
    assert "from the caption file" not in text and "batches per epoch: 6" in text

    (tmp_path / "bad.json").write_text(json.dumps({"0": {"caption": "x"}, "nope": {"caption": "y"}}),
                                       encoding="utf-8")
    from library.dataset_config import DatasetConfigError, blueprints_from_train_data_dir

    blueprints = blueprints_from_train_data_dir(folder, cli={"resolution": [64, 64]}, in_json=tmp_path / "bad.json")
    with pytest.raises(DatasetConfigError, match=r"bad\.json: no image for 1 key\(s\).*'nope'"):
        build_dataset(blueprints, seed=1)
