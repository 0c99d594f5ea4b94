"""Fast CLI (no torch/numpy), models listing, presets data validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fluxgym.cli import main
from fluxgym.generate import REPO_ROOT
from fluxgym.models import ModelError, resolve_base_model
from fluxgym.presets import PresetError, _parse_preset, get_preset, load_presets, presets_table


def test_cli_modules_do_not_import_heavy_libraries():
    code = ("import sys, fluxgym.cli, fluxgym.runner, fluxgym.status, fluxgym.generate, fluxgym.prepare, "
            "fluxgym.supervise, fluxgym.script\n"
            "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_models_list_and_resolution(root, capsys):
    assert main(["models", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "flux-dev" in out and "demo" in out and "missing" in out
    dev = resolve_base_model(root, "flux-dev")
    assert dev.unet == root / "models" / "unet" / "flux1-dev.sft"
    assert dev.clip_l == root / "models" / "clip" / "clip_l.safetensors" and dev.tokenizer_cache_dir is None
    other = resolve_base_model(root, "bdsqlsz/flux1-dev2pro-single")
    assert other.unet == root / "models" / "unet" / "bdsqlsz" / "flux1-dev2pro-single" / "flux1-dev2pro.safetensors"
    own = root / "my model.safetensors"
    own.write_bytes(b"x")
    assert resolve_base_model(root, str(own)).unet == own
    with pytest.raises(ModelError):
        resolve_base_model(root, "no-such-model")
    assert main(["models", "download", "demo", "--root", str(root)]) == 2  # built locally, never downloaded


def test_presets_are_versioned_data():
    presets = load_presets()
    assert all(p.version >= 1 and p.description and p.fp8_why for p in presets.values())
    assert all(flag.why for p in presets.values() for flag in p.block)
    assert get_preset("cpu").workers == 0 and get_preset("cpu").mixed_precision == "no"
    with pytest.raises(PresetError, match="unknown VRAM preset"):
        get_preset("10G")
    bad = {k: v for k, v in vars(get_preset("16G")).items() if k not in ("name", "block")}
    bad["block"] = [{"args": ["no-dashes"], "why": "x"}]
    with pytest.raises(PresetError, match="must be a flag"):
        _parse_preset("bad", bad)
    table = presets_table()
    assert "| 12G v1 | `--blocks_to_swap 18` |" in table
