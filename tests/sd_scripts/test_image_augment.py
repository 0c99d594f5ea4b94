"""--random_crop, --color_aug, --face_crop_aug_range: upstream's formulas on fixed arrays (expected values worked
out by hand from the formulas), the dataset's per-step samples, and the latent-cache conflict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library import image_augment as ia
from library.dataset import build_dataset, load_image_tensor
from library.dataset_config import load_dataset_config
from library.errors import EXIT_BAD_INPUT, BadFileError


class ScriptedRng:
    """Stands in for the numpy generator: returns the scripted values in order and records integer ranges."""

    def __init__(self, randoms=(), uniforms=(), integers=()):
        self.randoms, self.uniforms, self.ints = list(randoms), list(uniforms), list(integers)
        self.int_ranges = []

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, lo, hi):
        value = self.uniforms.pop(0)
        assert lo <= value <= hi
        return value

    def integers(self, lo, hi, endpoint=False):
        assert endpoint
        self.int_ranges.append((lo, hi))
        return self.ints.pop(0)


# OpenCV 8-bit HSV (upstream passes RGB to COLOR_BGR2HSV, so R plays blue): V = max, S = round(255 * diff / V),
# H = 30 * (...) / diff in 0-179. (255, 0, 0) -> H 120; (0, 255, 0) -> H 60; (10, 200, 30) -> H 57, S 242, V 200.
PIXELS = np.array([[[255, 0, 0], [0, 255, 0], [100, 100, 100], [10, 200, 30]]], dtype=np.uint8)


def test_hue_shift_follows_opencv_8bit_hsv_as_upstream_uses_it():
    # +8: H 128 -> sector 4, frac 0.2667 -> last = V * frac = 68; H 68 -> sector 2 -> first = 68;
    # grey (S 0) unchanged; H 65, S 242/255, V 200/255 -> first = V(1 - S(1 - 0.1667)) * 255 = 41.8 -> 42
    assert ia.hue_shift(PIXELS, 8.0).tolist() == [[[255, 0, 68], [68, 255, 0], [100, 100, 100], [42, 200, 10]]]
    # -8 wraps to +172: H (120 + 172) % 180 = 112 -> sector 3, frac 0.7333 -> green = V(1 - frac) = 68
    assert ia.hue_shift(PIXELS[:, :1], -8.0).tolist() == [[[255, 68, 0]]]
    # +0.5 is truncated away (57.5 -> 57); the 8-bit round trip alone turns 30 into 29 (as OpenCV does)
    assert ia.hue_shift(PIXELS, 0.5).tolist() == [[[255, 0, 0], [0, 255, 0], [100, 100, 100], [10, 200, 29]]]


def test_gamma_raises_the_byte_values_then_clips_and_truncates():
    px = np.array([100, 0, 255], dtype=np.uint8)
    assert ia.gamma_adjust(px, 1.05).tolist() == [125, 0, 255]  # 100^1.05 = 125.9; 255^1.05 = 336 -> 255
    assert ia.gamma_adjust(px, 0.95).tolist() == [79, 0, 193]  # 100^0.95 = 79.4; 255^0.95 = 193.3


def test_color_aug_draws_as_upstream():
    assert ia.color_aug(PIXELS, ScriptedRng(randoms=[0.34])) is PIXELS  # above 0.33: no change
    hue = ia.color_aug(PIXELS, ScriptedRng(randoms=[0.33, 0.51], uniforms=[8.0]))
    assert np.array_equal(hue, ia.hue_shift(PIXELS, 8.0))
    gamma = ia.color_aug(PIXELS, ScriptedRng(randoms=[0.1, 0.5], uniforms=[1.05]))
    assert np.array_equal(gamma, ia.gamma_adjust(PIXELS, 1.05))


def test_random_bucket_crop_and_no_bucket_window():
    rng = ScriptedRng(integers=[7])
    assert ia.random_bucket_offsets((80, 64), (64, 64), rng) == (7, 0)
    assert rng.int_ranges == [(0, 16)]  # no draw for a side that fits exactly
    rng = ScriptedRng(integers=[5, 30])
    assert ia.window_offsets((100, 80), (64, 64), rng) == (30, 5)
    assert rng.int_ranges == [(0, 16), (0, 36)]  # height first, as upstream


def test_face_box_comes_from_the_last_four_name_tokens(tmp_path):
    assert ia.face_box(tmp_path / "img_120_80_40_50.png") == (120, 80, 40, 50)
    assert ia.face_box(tmp_path / "a_1_2_3.png") is None  # fewer than five tokens
    assert ia.face_box(tmp_path / "my_cat_x_y_z.png") is None
    assert ia.face_box(tmp_path / "x_0_5_5_5.png") is None  # no face centre


def test_face_crop_scale_and_window():
    # face 20 px, range 2..2: min(target)/(20*2) = 1.6 -> capped at 1; window centred on the face (150-32, 50-32)
    assert ia.face_crop_plan((200, 100), (64, 64), (150, 50, 20, 20), (2.0, 2.0), False, None) == (
        (200, 100), (118, 18))
    # face 40 px, range 4..4: 64/160 = 0.4 < cover 0.64 -> scale 0.64: 128x64, face at (96, 32) -> left 64, top 0
    assert ia.face_crop_plan((200, 100), (64, 64), (150, 50, 40, 40), (4.0, 4.0), False, None) == (
        (128, 64), (64, 0))
    # random_crop: each axis moves by a + b - reach (reach = the longer distance to an edge), then clamps
    rng = ScriptedRng(integers=[10, 20, 30, 40])
    plan = ia.face_crop_plan((200, 100), (64, 64), (150, 50, 20, 20), (2.0, 2.0), True, rng)
    assert plan == ((200, 100), (38, 0))  # top 18+10+20-50 -> 0; left 118+30+40-150 = 38
    assert rng.int_ranges == [(0, 50), (0, 50), (0, 150), (0, 150)]


def test_face_crop_range_parsing():
    assert ia.parse_face_crop_range("2.0,4") == (2.0, 4.0)
    assert ia.parse_face_crop_range([1, 1]) == (1.0, 1.0)
    for bad in ("4,2", "2", "a,b", [0, 1]):
        with pytest.raises(ValueError):
            ia.parse_face_crop_range(bad)


def _toml(tmp_path, image_dir, subset_extra: str, dataset_extra: str = "") -> object:
    path = tmp_path / "d.toml"
    path.write_text(f"[[datasets]]\nresolution = 32\n{dataset_extra}\n[[datasets.subsets]]\nimage_dir = '{image_dir}'\n"
                    f"class_tokens = 'tok'\n{subset_extra}\n", encoding="utf-8")
    return path


def test_live_samples_are_seeded_per_place_cropped_with_their_mask_and_plain_for_validation(tmp_path):
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    alpha = rgb[..., :1].copy()  # alpha equals the red channel: the mask must be cropped/flipped with the image
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(image_dir / "a.png")
    path = _toml(tmp_path, image_dir, "random_crop = true\nflip_aug = true\nalpha_mask = true")
    (bp,) = load_dataset_config(path, cli={})
    assert bp.subsets[0].augment == ia.AugmentOptions(random_crop=True)
    ds = build_dataset([bp], seed=5)
    assert ia.needs_live_images(ds.items, cache_flag=None) and not ia.needs_live_images(ds.items, cache_flag="--x")
    ds.live_images = True
    samples = [ds[(epoch, 0, 0)] for epoch in range(6)]
    assert torch.equal(ds[(2, 0, 0)]["image"], samples[2]["image"])  # the same place draws the same crop
    windows = {tuple(s["image"][0, 0, :4].tolist()) for s in samples}
    assert len(windows) > 1  # a 32x32 window of a 64x48 image moves between epochs
    for s in samples:
        red = (s["image"][0] + 1.0) * 127.5
        expected = torch.nn.functional.avg_pool2d(red[None, None], 8)[0, 0] / 255.0
        assert s["image"].shape == (3, 32, 32) and torch.allclose(s["alpha_mask"], expected, atol=1e-4)
    from library.validation import SubsetDataset

    held_out = SubsetDataset(ds.items, [0], seed=5, augment=False)
    held_out.live_images = True
    plain = held_out[(0, 0)]["image"]
    assert torch.equal(plain, load_image_tensor(ds.items[0]))  # validation: the centre crop, unaugmented


def test_cache_flag_with_augmentation_is_refused_naming_both(tmp_path, caplog):
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    Image.new("RGB", (32, 32)).save(image_dir / "a.png")
    bps = load_dataset_config(_toml(tmp_path, image_dir, "color_aug = true"), cli={})
    with pytest.raises(ia.AugmentCacheConflict) as info:
        ia.check_latent_cache(bps, cache_flag="--cache_latents_to_disk")
    message = str(info.value)
    assert "color_aug" in message and "--cache_latents_to_disk" in message and "[[datasets.subsets]] #1" in message
    assert info.value.exit_code == EXIT_BAD_INPUT and isinstance(info.value, BadFileError)
    ia.check_latent_cache(bps, cache_flag=None)  # no cache flag: per-step encoding, no error
    face = load_dataset_config(_toml(tmp_path, image_dir, "face_crop_aug_range = [2.0, 4.0]"), cli={})
    ia.check_latent_cache(face, cache_flag="--cache_latents")  # upstream ignores it with a cache: a warning
    assert "face_crop_aug_range" in caplog.text and "--cache_latents" in caplog.text


def test_face_named_image_is_scaled_and_cropped_around_the_face(tmp_path):
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    rgb = np.random.default_rng(4).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(image_dir / "face_40_30_20_20.png")
    (image_dir / "face.caption").write_text("a face", encoding="utf-8")  # upstream's caption name for it
    (bp,) = load_dataset_config(_toml(tmp_path, image_dir, "face_crop_aug_range = [2.0, 2.0]"), cli={})
    ds = build_dataset([bp], seed=1)
    assert ds.items[0].caption == "a face"
    ds.live_images = True
    # scale: max(cover 0.533, 32 / (20 * 2) = 0.8) = 0.8 -> 64x48, face at (32, 24) -> window (16, 8) to (48, 40)
    expected = Image.fromarray(rgb).resize((64, 48), Image.Resampling.BOX).crop((16, 8, 48, 40))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert torch.equal(ds[(0, 0, 0)]["image"], expected)
