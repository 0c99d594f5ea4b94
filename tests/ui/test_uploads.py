"""Uploaded files: names sanitised, only images, a size limit, one fresh staging folder per upload."""
from __future__ import annotations

import pytest
from ui_helpers import write_images

from fluxgym.webui import uploads
from fluxgym.webui.form import FieldError


@pytest.mark.parametrize("given,expected", [
    ("../../etc/passwd.png", "passwd.png"), ("C:\\Users\\x\\..\\evil.JPG", "evil.jpg"),
    ("..png", "png"), ("photo é ü $(id).png", "photo_e_u_id_.png"), ("/", "image"), (".hidden.webp", "hidden.webp"),
])
def test_safe_name(given, expected):
    assert uploads.safe_name(given) == expected


def test_stage_keeps_inside_and_dedupes(tmp_path):
    imgs = write_images(tmp_path / "src", n=3)
    files = [("../../a.png", imgs[0]), ("sub/a.png", imgs[1]), ("a.PNG", imgs[2])]
    folder = uploads.stage_uploads(tmp_path, files, {"../../a.png": "first caption"})
    assert folder.parent == tmp_path / uploads.STAGING
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["a.png", "a.txt", "a_2.png", "a_3.png"]
    assert (folder / "a.txt").read_text() == "first caption"
    again = uploads.stage_uploads(tmp_path, files[:1])
    assert again != folder and sorted(p.name for p in again.iterdir()) == ["a.png"]


def test_refuses_non_images_and_big_files(tmp_path, monkeypatch):
    imgs = write_images(tmp_path / "src", n=2)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    with pytest.raises(FieldError, match="fake.png.*cannot be read as an image") as e:
        uploads.stage_uploads(tmp_path, [("fake.png", fake), ("ok.png", imgs[0])])
    assert e.value.field == "images"
    with pytest.raises(FieldError, match="run.sh.*not an image type"):
        uploads.stage_uploads(tmp_path, [("run.sh", script)])
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(FieldError, match="over the"):
        uploads.stage_uploads(tmp_path, [("big.png", imgs[1])])
    assert not (tmp_path / uploads.STAGING).exists()  # nothing staged when anything is refused
