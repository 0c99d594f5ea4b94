"""`prepare`: resize to the shorter side, keep captions, and refuse bad folders before writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fg_helpers import make_images
from fluxgym.cli import main
from fluxgym.prepare import DatasetError, prepare_dataset


def test_resize_and_captions(tmp_path, root):
    src = make_images(tmp_path / "src", 3, size=(300, 200), captions={"img1": "my own caption"})
    Image.new("RGB", (100, 400)).save(src / "tall.jpg")
    assert main(["prepare", "Cats", "--images", str(src), "--trigger", "ohwx cat", "--root", str(root),
                 "--resolution", "128"]) == 0
    ds = root / "datasets" / "cats"
    with Image.open(ds / "img0.png") as im:
        assert im.size == (192, 128)
    with Image.open(ds / "tall.jpg") as im:
        assert im.size == (128, 512)
    assert (ds / "img1.txt").read_text() == "my own caption"
    assert (ds / "img0.txt").read_text() == "ohwx cat"
    # A caption edited in the dataset survives a re-run of prepare.
    (ds / "img2.txt").write_text("edited")
    prepare_dataset(src, ds, trigger="other", resolution=128)
    assert (ds / "img2.txt").read_text() == "edited"


def test_alpha_png_to_jpeg_and_rgba(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGBA", (80, 80), (1, 2, 3, 100)).save(src / "a.png")
    Image.new("RGB", (80, 64)).save(src / "b.webp")
    done = prepare_dataset(src, tmp_path / "ds", trigger="t", resolution=64)
    assert [p.image.name for p in done] == ["a.png", "b.webp"]


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"), ("empty", "at least 2"), ("one", "at least 2"),
    ("nonimage", "not an image"), ("corrupt", "cannot be read"),
])
def test_bad_folders(tmp_path, case, message):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case in ("one", "nonimage", "corrupt"):
        make_images(src, 1 if case == "one" else 2)
    if case == "nonimage":
        (src / "notes.pdf").write_bytes(b"%PDF")
    if case == "corrupt":
        (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(DatasetError, match=message):
        prepare_dataset(src, tmp_path / "ds", trigger="t", resolution=64)
    assert not (tmp_path / "ds").exists(), "nothing may be written when the input is bad"


def test_cli_reports_bad_input_with_exit_2(tmp_path, root, capsys):
    assert main(["prepare", "x", "--images", str(tmp_path / "none"), "--root", str(root)]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_prepare_refuses_a_name_that_collides(tmp_path, root, capsys):
    src = make_images(tmp_path / "src", 2)
    assert main(["prepare", "My LoRA", "--images", str(src), "--trigger", "a", "--root", str(root)]) == 0
    other = make_images(tmp_path / "other", 3)
    assert main(["prepare", "my lora!", "--images", str(other), "--trigger", "b", "--root", str(root)]) == 2
    assert "already belongs to 'My LoRA'" in capsys.readouterr().err
    assert len(list((root / "datasets" / "my-lora").glob("*.png"))) == 2
    assert main(["prepare", "My LoRA", "--images", str(src), "--trigger", "a", "--root", str(root)]) == 0


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_rerun_with_another_folder_refuses_then_replace_matches_it(tmp_path, root, capsys):
    first = make_images(tmp_path / "first", 3, captions={"img1": "cap one"})
    args = ["prepare", "Cats", "--trigger", "tok", "--root", str(root), "--resolution", "64"]
    assert main(args + ["--images", str(first)]) == 0
    ds = root / "datasets" / "cats"
    (ds / "img0.txt").write_text("edited in the dataset")
    for name in ("img1_64x53_flux.npz", "img1_flux_te.npz", "img0_flux_te.npz"):  # the trainer's caches
        (ds / name).write_bytes(b"npz")
    (ds / ".img2.png.tmp-999999999").write_bytes(b"half")  # a killed prepare's temporary file
    second = make_images(tmp_path / "second", 1, captions={"img0": "new caption"})
    Image.new("RGB", (70, 64)).save(second / "b.png")
    capsys.readouterr()

    before = _snapshot(ds)
    assert main(args + ["--images", str(second)]) == 2
    err = capsys.readouterr().err
    for name in ("img1.png", "img1.txt", "img2.png", "img2.txt"):
        assert f"  - {name}: not in {second}" in err
    assert f"  - img0.txt: {second / 'img0.txt'} holds a different caption" in err
    assert "--replace" in err and "Nothing was changed" in err
    assert _snapshot(ds) == before, "a refused prepare must not touch the dataset"

    with open(ds / "img0.txt") as reader:  # opened before the rewrite: must keep seeing the old file whole
        assert main(args + ["--images", str(second), "--replace"]) == 0
        assert reader.read() == "edited in the dataset"
    out = capsys.readouterr().out
    assert out.index("removing img1.png") < out.index("prepared 2 images")
    assert f"replacing img0.txt with {second / 'img0.txt'}" in out
    assert sorted(p.name for p in ds.iterdir()) == ["b.png", "b.txt", "img0.png", "img0.txt", "img0_flux_te.npz"]
    assert (ds / "img0.txt").read_text() == "new caption" and (ds / "b.txt").read_text() == "tok"
    # The dataset now matches the folder: running it again needs no --replace and changes nothing.
    again = _snapshot(ds)
    assert main(args + ["--images", str(second)]) == 0
    assert _snapshot(ds) == again


def test_failed_write_leaves_the_old_copy_and_no_temp_file(tmp_path, monkeypatch):
    src = make_images(tmp_path / "src", 2)
    ds = tmp_path / "ds"
    prepare_dataset(src, ds, trigger="t", resolution=64)
    before = _snapshot(ds)

    def disk_full(self, fp, *a, **kw):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_dataset(src, ds, trigger="t", resolution=64)
    assert _snapshot(ds) == before


def test_system_files_are_skipped_with_a_note_and_other_files_named(tmp_path, root, capsys):
    src = make_images(tmp_path / "src", 2, captions={"img0": "cap"})
    junk = ["Thumbs.db", "desktop.ini", ".DS_Store", "._img0.png", ".hidden.png", "Icon\r"]
    for name in junk:
        (src / name).write_bytes(b"\0\1junk")
    (src / "__MACOSX").mkdir()
    (src / "originals").mkdir()
    (src / "readme.txt").write_text("not a caption")
    assert main(["prepare", "j", "--images", str(src), "--trigger", "t", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "note: skipped 7 system/hidden file(s)" in out
    assert all(name in out for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._img0.png", "'Icon\\r'"))
    assert "subfolders are not read" in out and "originals" in out
    assert "not the caption of any image, ignored: readme.txt" in out
    ds = root / "datasets" / "j"
    assert sorted(p.name for p in ds.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]

    (src / "notes.pdf").write_bytes(b"%PDF")
    (src / "clip.mp4").write_bytes(b"\0")
    assert main(["prepare", "j", "--images", str(src), "--trigger", "t", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "  - clip.mp4: not an image" in err and "  - notes.pdf: not an image" in err and "move it out" in err
    assert "Thumbs.db" not in err


def test_captions_must_be_utf8_and_a_bom_is_stripped(tmp_path, root, capsys):
    src = make_images(tmp_path / "src", 3)
    (src / "img0.txt").write_bytes(b"\xef\xbb\xbfohwx caf\xc3\xa9\r\nsecond line")  # Notepad's "UTF-8 with BOM"
    (src / "img1.txt").write_bytes(b"ohwx caf\xe9")  # Latin-1
    (src / "img2.txt").write_bytes("ohwx".encode("utf-16"))  # Notepad's "Unicode"
    args = ["prepare", "u", "--images", str(src), "--trigger", "t", "--root", str(root)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{src / 'img1.txt'}: not UTF-8 text (byte 0xe9 at offset 8)" in err
    assert f"{src / 'img2.txt'}: not UTF-8 text" in err and "it looks like UTF-16" in err
    assert "save it with the encoding UTF-8" in err and "img0.txt" not in err
    assert not (root / "datasets").exists(), "nothing may be copied when a caption is bad"

    (src / "img1.txt").write_text("ohwx café", encoding="utf-8")
    (src / "img2.txt").unlink()
    assert main(args) == 0
    ds = root / "datasets" / "u"
    assert (ds / "img0.txt").read_bytes() == "ohwx café\r\nsecond line".encode()  # BOM gone, the rest exact
    assert main(args) == 0, "the same folder again is not a conflict"
    (ds / "img2.txt").write_bytes(b"\xff\xfe")  # a caption kept from the dataset is checked too
    assert main(args) == 2
    assert f"{ds / 'img2.txt'}: not UTF-8 text" in capsys.readouterr().err


def test_a_folder_the_trainer_cached_in_is_accepted(tmp_path, root, capsys):
    """An sd-scripts dataset folder already trained with --cache_latents_to_disk / --cache_text_encoder_outputs_to_disk
    (the demo's datasets/demo, or the UI pointed at one) holds the trainer's .npz caches: skipped with a note,
    never copied, and not "move it out of the folder"."""
    src = make_images(tmp_path / "src", 2, captions={"img0": "cap"})
    for name in ("img0_0064x0064_flux.npz", "img0_flux_te.npz", "img1_0512x0512_flux.npz"):
        (src / name).write_bytes(b"PK\3\4cache")
    assert main(["prepare", "c", "--images", str(src), "--trigger", "t", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 cache file(s) of the trainer" in out and "img0_flux_te.npz" in out
    ds = root / "datasets" / "c"
    assert sorted(p.name for p in ds.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]
    (src / "other.npz").write_bytes(b"\0")  # an .npz that is no cache of one of its images is still named
    assert main(["prepare", "c", "--images", str(src), "--trigger", "t", "--root", str(root), "--replace"]) == 2
    assert "  - other.npz: not an image" in capsys.readouterr().err
