"""Fixtures for the fluxgym tests (helpers live in fg_helpers.py)."""

from pathlib import Path

import pytest


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    return r
