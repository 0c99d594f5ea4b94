"""Shared helpers for the patch-tool tests (a unique module name, so it never shadows another conftest)."""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LAYOUTS = ("monolith_2026_02", "split_2026_05")


def snapshot(root: Path) -> dict:
    """Every file under root (state folder included) as relpath -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_layout(layout: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / layout, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest
