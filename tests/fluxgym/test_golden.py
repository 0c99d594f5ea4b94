"""Golden files: the exact train.sh / train.bat / dataset.toml each preset generates.

Paths are normalised (<ROOT> = project root, <REPO> = this checkout). After an intended change, refresh
with FLUXGYM_UPDATE_GOLDEN=1 and review the diff: it is the change users will see in their scripts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fg_helpers import make_images
from fluxgym.generate import REPO_ROOT, GenerateOptions, generate
from fluxgym.prepare import prepare_dataset
from fluxgym.presets import get_preset, preset_names

GOLDEN = Path(__file__).resolve().parent / "golden"
EXPECTED_PRESETS = ["24G", "20G", "16G", "12G", "8G", "cpu"]


def _normalise(text: str, root: Path) -> str:
    return text.replace(str(root), "<ROOT>").replace(str(REPO_ROOT), "<REPO>")


def test_all_presets_present():
    assert preset_names() == EXPECTED_PRESETS


@pytest.mark.parametrize("preset", EXPECTED_PRESETS)
def test_preset_golden(tmp_path, preset):
    root = tmp_path / "proj"
    prepare_dataset(make_images(tmp_path / "src", 2), root / "datasets" / "golden-lora", trigger="tok", resolution=64)
    base = "demo" if preset == "cpu" else "flux-dev"
    res = generate(GenerateOptions(name="golden-lora", vram=preset, root=root, trigger="ohwx person",
                                   base_model=base, sample_every=50))
    for key, suffix in (("train.sh", "train.sh"), ("train.bat", "train.bat"), ("dataset.toml", "dataset.toml")):
        got = _normalise(res.files[key].read_text(encoding="utf-8", errors="strict"), root)
        golden = GOLDEN / f"{preset}.{suffix}"
        if os.environ.get("FLUXGYM_UPDATE_GOLDEN"):
            golden.write_text(got, encoding="utf-8", newline="")
        assert golden.is_file(), f"missing golden file {golden}; run with FLUXGYM_UPDATE_GOLDEN=1"
        assert got == golden.read_text(encoding="utf-8"), f"{preset} {key} differs from {golden}"


def test_preset_specific_flags(tmp_path):
    """What the issue asks of each preset, independent of the golden text."""
    for sh in GOLDEN.glob("*.train.sh"):
        text = "\n".join(line for line in sh.read_text().splitlines() if not line.startswith("#"))
        assert "--split_mode" not in text  # deprecated upstream; 12G says --blocks_to_swap instead
        assert "--save_state" in text and "--save_last_n_epochs_state 2" in text
        assert text.rstrip().endswith('"$@"')
    g12 = (GOLDEN / "12G.train.sh").read_text()
    g8 = (GOLDEN / "8G.train.sh").read_text()
    assert "--blocks_to_swap 18" in g12 and "train_blocks=single" in g12
    swap8 = int(g8.split("--blocks_to_swap ")[1].split()[0])
    assert swap8 > 18
    assert get_preset("8G").resolution < get_preset("12G").resolution
    assert "adafactor" in (GOLDEN / "16G.train.sh").read_text() and "--max_grad_norm 0.0" in g12
    assert "adamw8bit" in (GOLDEN / "20G.train.sh").read_text()
    cpu = (GOLDEN / "cpu.train.sh").read_text()
    assert "--mixed_precision no" in cpu and "--fp8_base" not in cpu and "--blocks_to_swap" not in cpu
    assert "--tokenizer_cache_dir <ROOT>/models/tokenizers/demo" in cpu
    assert "fp8" in get_preset("24G").fp8_why and "23.8 GB" in get_preset("24G").fp8_why
