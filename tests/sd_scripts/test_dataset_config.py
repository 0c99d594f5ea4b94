"""dataset.toml / .json: FluxGym's file, lookup order, and one clear error per bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tomli_w
from PIL import Image

from library.dataset_config import (
    DatasetConfigError,
    blueprints_from_train_data_dir,
    load_dataset_config,
    parse_resolution,
)

TRIGGER = 'Zoë\'s "ünïcode" cat ✨'


def _images(folder: Path, n: int = 2, size=(64, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40, 10, 200)).save(folder / f"img{i}.png")
    return folder


def _write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _toml(tmp_path: Path, config: dict, name: str = "dataset.toml") -> Path:
    return _write(tmp_path, tomli_w.dumps(config), name)


@pytest.fixture
def img_dir(tmp_path) -> Path:
    return _images(tmp_path / "imgs")


def test_fluxgym_upstream_literal_toml_parses(tmp_path, img_dir):
    # FluxGym's gen_toml output, verbatim layout: single-quoted literals (a `"` and unicode are fine there)
    text = f"""[general]
shuffle_caption = false
caption_extension = '.txt'
keep_tokens = 1

# This is a dataset
[[datasets]]
resolution = 512
batch_size = 1
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = '{img_dir}'
  class_tokens = 'Zoë "ünïcode" cat ✨'
  num_repeats = 10
"""
    (bp,) = load_dataset_config(_write(tmp_path, text), cli={"train_batch_size": 4, "resolution": "1024"})
    assert bp.resolution == (512, 512) and bp.batch_size == 1 and bp.enable_bucket is False
    (sub,) = bp.subsets
    assert sub.class_tokens == 'Zoë "ünïcode" cat ✨'
    assert (sub.caption_extension, sub.keep_tokens, sub.num_repeats, sub.image_dir) == (".txt", 1, 10, img_dir)


def test_fluxgym_escaped_toml_with_apostrophe_and_json_variant(tmp_path, img_dir):
    config = {
        "general": {"shuffle_caption": False, "caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [{"resolution": 512, "batch_size": 1, "keep_tokens": 1,
                      "subsets": [{"image_dir": str(img_dir), "class_tokens": TRIGGER, "num_repeats": 10}]}],
    }
    from_toml = load_dataset_config(_toml(tmp_path, config), cli={})
    from_json = load_dataset_config(_write(tmp_path, json.dumps(config), "dataset.json"), cli={})
    assert from_toml[0].subsets[0].class_tokens == TRIGGER
    assert [(b.resolution, b.batch_size, b.subsets[0].class_tokens) for b in from_json] == [
        ((512, 512), 1, TRIGGER)
    ]
    assert from_toml[0].subsets[0].num_repeats == from_json[0].subsets[0].num_repeats == 10


def test_unescaped_quote_in_fluxgym_toml_names_the_file(tmp_path, img_dir):
    text = (f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{img_dir}'\n"
            "class_tokens = 'Zoë's cat'\n")
    path = _write(tmp_path, text)
    with pytest.raises(DatasetConfigError, match="not valid TOML") as info:
        load_dataset_config(path, cli={})
    assert str(path) in str(info.value)


def test_lookup_order_subset_dataset_general_cli_default(tmp_path):
    dirs = [_images(tmp_path / f"d{i}") for i in range(4)]
    config = {
        "general": {"num_repeats": 3, "flip_aug": True},
        "datasets": [
            {"num_repeats": 4, "resolution": [128, 64], "subsets": [
                {"image_dir": str(dirs[0]), "num_repeats": 5},
                {"image_dir": str(dirs[1])},
            ]},
            {"subsets": [{"image_dir": str(dirs[2]), "caption_prefix": "a photo of"}]},
        ],
    }
    cli = {"resolution": "96,80", "caption_extension": ".txt", "train_batch_size": 2, "num_repeats": 9,
           "enable_bucket": None}
    first, second = load_dataset_config(_toml(tmp_path, config), cli=cli)
    assert [s.num_repeats for s in first.subsets] == [5, 4]  # subset, then dataset
    assert second.subsets[0].num_repeats == 3  # general beats the command line
    assert first.resolution == (128, 64) and second.resolution == (96, 80)  # dataset, then cli
    assert first.batch_size == second.batch_size == 2  # --train_batch_size maps to batch_size
    assert second.subsets[0].caption_extension == ".txt"  # from the cli
    assert second.subsets[0].caption_prefix == "a photo of" and first.subsets[0].caption_prefix is None
    assert all(s.flip_aug for b in (first, second) for s in b.subsets)
    assert first.enable_bucket is False and first.min_bucket_reso == 256  # defaults (None on the cli skipped)

    only_cli = {"datasets": [{"subsets": [{"image_dir": str(dirs[3])}]}]}
    (bp,) = load_dataset_config(_toml(tmp_path, only_cli, "b.toml"), cli={"resolution": 64})
    assert (bp.resolution, bp.subsets[0].num_repeats, bp.subsets[0].caption_extension) == ((64, 64), 1, ".caption")


def test_unsupported_keys_at_default_are_accepted(tmp_path, img_dir):
    config = {"general": {"shuffle_caption": False, "caption_dropout_rate": 0.0, "color_aug": False,
                          "token_warmup_step": 0},
              "datasets": [{"resolution": 64, "subsets": [{"image_dir": str(img_dir), "is_reg": False}]}]}
    assert load_dataset_config(_toml(tmp_path, config), cli={"random_crop": False})[0].resolution == (64, 64)


ERROR_CASES = {
    "unknown_general": ({"general": {"shufle_caption": False}}, {}, "shufle_caption"),
    "unknown_dataset": ({"dataset": {"resolutoin": 512}}, {}, "resolutoin"),
    "unknown_subset": ({"subset": {"num_repeat": 3}}, {}, "num_repeat"),
    "shuffle_caption_not_bool": ({"general": {"shuffle_caption": "yes"}}, {}, "shuffle_caption"),
    "caption_dropout_above_1": ({"subset": {"caption_dropout_rate": 1.5}}, {}, "caption_dropout_rate"),
    "color_aug_not_bool": ({"dataset": {"color_aug": "yes"}}, {}, "color_aug"),
    "face_crop_range_reversed": ({"subset": {"face_crop_aug_range": [4.0, 2.0]}}, {}, "face_crop_aug_range"),
    "token_warmup": ({"general": {"token_warmup_step": 5}}, {}, "token_warmup_step"),
    "metadata_file_missing": ({"subset": {"metadata_file": "no-such-meta.json"}}, {}, "metadata_file"),
    "validation_split_1": ({"dataset": {"validation_split": 1.0}}, {}, "validation_split"),
    "validation_seed_negative": ({"general": {"validation_seed": -1}}, {}, "validation_seed"),
    "validation_split_in_subset": ({"subset": {"validation_split": 0.1}}, {}, "validation_split"),
    "alpha_mask_in_general": ({"general": {"alpha_mask": True}}, {}, "alpha_mask"),
    "bad_interpolation": ({"dataset": {"resize_interpolation": "sinc"}}, {}, "resize_interpolation"),
    "image_dir_in_general": ({"general": {"image_dir": "x"}}, {}, "image_dir"),
    "batch_size_in_subset": ({"subset": {"batch_size": 2}}, {}, "batch_size"),
    "bucket_steps_32": ({"dataset": {"bucket_reso_steps": 32}}, {}, "bucket_reso_steps"),
    "bad_type": ({"dataset": {"batch_size": "2"}}, {}, "batch_size"),
    "bad_bool": ({"general": {"enable_bucket": "yes"}}, {}, "enable_bucket"),
    "bad_resolution": ({"dataset": {"resolution": [512]}}, {}, "resolution"),
    "min_over_max": ({"dataset": {"enable_bucket": True, "min_bucket_reso": 1024, "max_bucket_reso": 512}}, {},
                     "min_bucket_reso"),
    "no_resolution": ({"dataset": {"resolution": None}}, {}, "resolution"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_every_error_names_key_and_file(tmp_path, img_dir, case):
    patch, cli, key = ERROR_CASES[case]
    dataset = {"resolution": 64, **patch.get("dataset", {})}
    dataset = {k: v for k, v in dataset.items() if v is not None}
    subset = {"image_dir": str(img_dir), **patch.get("subset", {})}
    config = {"general": patch.get("general", {}), "datasets": [{**dataset, "subsets": [subset]}]}
    path = _toml(tmp_path, config)
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(path, cli=cli)
    message = str(info.value)
    assert key in message and str(path) in message, message


def test_unsupported_message_wording(tmp_path, img_dir):
    config = {"general": {"token_warmup_step": 5}, "datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(img_dir)}]}]}
    path = _toml(tmp_path, config)
    expected = r"token_warmup_step in \[general\] in .* is not supported by this trainer"
    with pytest.raises(DatasetConfigError, match=expected):
        load_dataset_config(path, cli={})


@pytest.mark.parametrize("problem", ["missing_key", "not_exist", "not_dir", "no_images"])
def test_image_dir_problems(tmp_path, problem):
    target = tmp_path / "imgs"
    subset = {"image_dir": str(target)}
    if problem == "missing_key":
        subset = {"num_repeats": 2}
    elif problem == "not_dir":
        target.write_text("x")
    elif problem == "no_images":
        target.mkdir()
        (target / "notes.txt").write_text("no images here")
    path = _toml(tmp_path, {"datasets": [{"resolution": 64, "subsets": [subset]}]})
    with pytest.raises(DatasetConfigError, match="image_dir") as info:
        load_dataset_config(path, cli={})
    assert str(path) in str(info.value)


def test_structure_errors(tmp_path, img_dir):
    with pytest.raises(DatasetConfigError, match="does not exist"):
        load_dataset_config(tmp_path / "missing.toml", cli={})
    no_subsets = _toml(tmp_path, {"datasets": [{"resolution": 64}]}, "a.toml")
    with pytest.raises(DatasetConfigError, match="subsets") as info:
        load_dataset_config(no_subsets, cli={})
    assert str(no_subsets) in str(info.value)
    top = _toml(tmp_path, {"general": {}, "dataset": [{"resolution": 64}]}, "b.toml")
    with pytest.raises(DatasetConfigError, match="'dataset'"):
        load_dataset_config(top, cli={})
    bad_json = _write(tmp_path, "{not json", "c.json")
    with pytest.raises(DatasetConfigError, match="not valid JSON") as info:
        load_dataset_config(bad_json, cli={})
    assert str(bad_json) in str(info.value)


def test_cli_unsupported_flag_is_named(tmp_path, img_dir):
    path = _toml(tmp_path, {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(img_dir)}]}]})
    with pytest.raises(DatasetConfigError, match="--token_warmup_step"):
        load_dataset_config(path, cli={"token_warmup_step": 5})


def test_resolution_rounded_to_multiple_of_16_with_warning(tmp_path, img_dir, caplog):
    path = _toml(tmp_path, {"datasets": [{"resolution": [500, 260], "subsets": [{"image_dir": str(img_dir)}]}]})
    with caplog.at_level(logging.WARNING):
        (bp,) = load_dataset_config(path, cli={})
    assert bp.resolution == (496, 256)
    assert "rounded down" in caplog.text and str(path) in caplog.text


def test_caption_extension_without_dot(tmp_path, img_dir):
    path = _toml(tmp_path, {"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(img_dir), "caption_extension": "txt"}]}]})
    assert load_dataset_config(path, cli={})[0].subsets[0].caption_extension == ".txt"


def test_parse_resolution_forms():
    assert parse_resolution(512, "x") == (512, 512)
    assert parse_resolution("768,512", "x") == (768, 512)
    assert parse_resolution([640, 384], "x") == (640, 384)
    with pytest.raises(DatasetConfigError, match="resolution .big. in --resolution"):
        parse_resolution("big", "--resolution")


def test_kohya_train_data_dir(tmp_path, caplog):
    root = tmp_path / "train"
    _images(root / "10_mychar woman", n=3)
    _images(root / "2_style", n=1)
    (root / "notes").mkdir()
    with caplog.at_level(logging.WARNING):
        (bp,) = blueprints_from_train_data_dir(root, cli={"resolution": "64", "caption_extension": ".txt"})
    assert [(s.num_repeats, s.class_tokens) for s in bp.subsets] == [(10, "mychar woman"), (2, "style")]
    assert bp.resolution == (64, 64) and "notes" in caplog.text
    with pytest.raises(DatasetConfigError, match="train_data_dir"):
        blueprints_from_train_data_dir(tmp_path / "nothing", cli={"resolution": 64})
