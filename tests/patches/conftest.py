"""Fixtures for the patch-tool tests: fresh copies of the two upstream-shaped fixture checkouts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patchtool_helpers import LAYOUTS, copy_layout  # noqa: E402


@pytest.fixture
def make_checkout(tmp_path):
    return lambda layout: copy_layout(layout, tmp_path / layout)


@pytest.fixture(params=LAYOUTS)
def checkout(request, make_checkout) -> Path:
    return make_checkout(request.param)
