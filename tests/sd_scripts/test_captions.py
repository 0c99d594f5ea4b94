"""Caption options (library.captions) with upstream's meaning, the text-encoder cache rule, and reproducibility."""
from __future__ import annotations

import random

import pytest

from library.captions import CaptionOptions, caption_rng, per_step_options, process_caption, validation_caption

CAPTION = "tok, red hair, blue eyes, smiling, outdoors, hat"
TAGS = [t.strip() for t in CAPTION.split(",")]


def _run(opts: CaptionOptions, caption: str = CAPTION, *, epoch: int = 1, seed: int = 0) -> str:
    return process_caption(caption, opts, random.Random(seed), epoch=epoch)


def test_shuffle_keeps_the_first_keep_tokens_and_every_tag():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    outputs = {_run(opts, seed=s) for s in range(30)}
    assert len(outputs) > 5  # the order really changes
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "tok" and sorted(tags) == sorted(TAGS)


def test_keep_tokens_separator_fixes_head_and_tail():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    caption = "tok, style ||| a, b, c, d ||| signature"
    outs = {_run(opts, caption, seed=s) for s in range(30)}
    assert len(outs) > 3
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["tok", "style"] and tags[-1] == "signature" and sorted(tags[2:-1]) == list("abcd")


def test_secondary_separator_keeps_a_group_together_and_becomes_the_separator():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, secondary_separator=";;;")
    caption = "tok, red;;;hair, blue eyes, hat"
    for s in range(10):
        out = _run(opts, caption, seed=s)
        assert "red,hair" in out and ";;;" not in out  # replaced after shuffling, no space added (upstream)


def test_caption_separator_other_than_comma():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_separator="|")
    out = _run(opts, "tok|a|b|c")
    assert out.split(", ")[0] == "tok" and sorted(out.split(", ")[1:]) == ["a", "b", "c"]  # joined with ", "


def test_caption_dropout_rate_counts():
    opts = CaptionOptions(caption_dropout_rate=0.25)
    empty = sum(_run(opts, seed=s) == "" for s in range(2000))
    assert 400 <= empty <= 600  # 500 expected; binomial sd ~19
    assert _run(CaptionOptions(caption_dropout_rate=1.0)) == ""


def test_caption_dropout_every_n_epochs_uses_one_based_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=2)
    assert [_run(opts, epoch=e) == "" for e in (1, 2, 3, 4)] == [False, True, False, True]


def test_tag_dropout_spares_keep_tokens():
    opts = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert _run(opts) == "tok"
    half = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    kept = sum(len(_run(half, seed=s).split(", ")) - 1 for s in range(400))
    assert 800 <= kept <= 1200  # 5 droppable tags * 400 * 0.5 = 1000


def test_wildcards_choose_per_step_and_keep_escaped_braces():
    opts = CaptionOptions(enable_wildcard=True)
    outs = {_run(opts, "tok, {red|blue|green} ball, {{literal}}", seed=s) for s in range(40)}
    assert outs == {f"tok, {c} ball, {{literal}}" for c in ("red", "blue", "green")}
    lines = {_run(opts, "first line\nsecond line", seed=s) for s in range(40)}
    assert lines == {"first line", "second line"}
    assert _run(CaptionOptions(), "first line\nsecond line") == "first line"  # without wildcards: first line


def test_same_place_same_caption_other_place_other_caption():
    opts = CaptionOptions(shuffle_caption=True, caption_dropout_rate=0.1, keep_tokens=1)
    a = [process_caption(CAPTION, opts, caption_rng(42, 3, 7, 1), epoch=4) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    others = {process_caption(CAPTION, opts, caption_rng(42, e, 7, r), epoch=e + 1) for e in range(5)
              for r in range(3)}
    assert len(others) > 5


def test_validation_caption_has_no_shuffle_or_dropout():
    opts = CaptionOptions(shuffle_caption=True, caption_dropout_rate=1.0, enable_wildcard=True, keep_tokens=1)
    assert validation_caption("tok, a, b, {x|y}", opts, random.Random(0)) in ("tok, a, b, x", "tok, a, b, y")


def test_per_step_options_name_what_forbids_the_cache():
    assert per_step_options(CaptionOptions(secondary_separator=";", keep_tokens=2)) == []
    assert per_step_options(CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.1)) == [
        "shuffle_caption", "caption_tag_dropout_rate"]


@pytest.mark.parametrize("flag", [["--shuffle_caption"], ["--caption_dropout_rate", "0.1"],
                                  ["--caption_tag_dropout_rate", "0.2"], ["--enable_wildcard"]])
def test_per_step_caption_flag_with_cached_text_encoder_names_both(flag):
    import flux_train_network
    from library.settings import SettingsError, settings_from_args

    base = ["--pretrained_model_name_or_path", "m", "--clip_l", "c", "--t5xxl", "t", "--ae", "a",
            "--dataset_config", "d.toml", "--output_dir", "o"]
    ns = flux_train_network.setup_parser().parse_args(base + flag + ["--cache_text_encoder_outputs_to_disk"])
    with pytest.raises(SettingsError) as info:
        settings_from_args(ns)
    assert flag[0] in str(info.value) and "--cache_text_encoder_outputs_to_disk" in str(info.value)


def test_dataset_toml_caption_keys_reach_items_and_cache_rule(tmp_path):
    from PIL import Image

    from library.dataset import build_dataset
    from library.dataset_config import DatasetConfigError, check_text_encoder_cache, load_dataset_config
    from library.settings import DataSettings

    images = tmp_path / "img"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 90, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("tok, a, b, c, d, e", encoding="utf-8")
    toml = tmp_path / "d.toml"
    toml.write_text(f"[general]\nshuffle_caption = true\nkeep_tokens = 1\ncaption_extension = '.txt'\n"
                    f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
                    "caption_tag_dropout_rate = 0.2\n", encoding="utf-8")
    blueprints = load_dataset_config(toml, cli={})
    opts = blueprints[0].subsets[0].caption_options
    assert (opts.shuffle_caption, opts.keep_tokens, opts.caption_tag_dropout_rate) == (True, 1, 0.2)
    data = DataSettings(dataset_config=str(toml), train_data_dir=None, cli_fallbacks={}, cache_latents_to_disk=False,
                        cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=False, vae_batch_size=1,
                        text_encoder_batch_size=None, num_workers=0, persistent_workers=False)
    with pytest.raises(DatasetConfigError, match="shuffle_caption.*--cache_text_encoder_outputs"):
        check_text_encoder_cache(blueprints, data)
    ds = build_dataset(blueprints, seed=5)
    assert ds.caption_for(0, 0, 0) == ds.caption_for(0, 0, 0)  # a pure function of its place
    seen = {ds.caption_for(e, 0, r) for e in range(4) for r in range(3)}
    assert len(seen) > 3 and all(c.startswith("tok") for c in seen)
