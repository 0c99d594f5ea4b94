"""Optional: the whole round trip on a real upstream sd-scripts checkout named by SD_SCRIPTS_UPSTREAM (on a copy)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from patchtool_helpers import snapshot

from patches import apply

UPSTREAM = os.environ.get("SD_SCRIPTS_UPSTREAM")

pytestmark = [
    pytest.mark.upstream,
    pytest.mark.skipif(not UPSTREAM, reason="set SD_SCRIPTS_UPSTREAM to a real sd-scripts checkout"),
]


def test_real_checkout_apply_check_reapply_reverse(tmp_path, capsys):
    dest = tmp_path / "sd-scripts"
    shutil.copytree(
        Path(UPSTREAM), dest, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.ckpt", "venv", ".venv")
    )
    before = snapshot(dest)
    assert apply.main([str(dest)]) == 0, capsys.readouterr()
    patched = snapshot(dest)
    assert patched != before
    assert apply.main(["--check", str(dest)]) == 0
    assert apply.main([str(dest)]) == 0 and snapshot(dest) == patched
    assert apply.main(["--reverse", str(dest)]) == 0
    assert snapshot(dest) == before
