"""Shared test set-up: import paths, offline guards, and the session-wide tiny FLUX model files.

Everything runs on CPU with no network; the tiny models are built once per session from seeded
random init in the same single-file formats real users have.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SD_SCRIPTS = REPO / "sd-scripts"
for p in (str(SD_SCRIPTS), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

# No test may reach a model hub; these make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter subprocess tests should use (the project's venv when present)."""
    cand = REPO / ".venv" / "bin" / "python"
    return str(cand) if cand.exists() else sys.executable


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny FLUX-architecture DiT/AE/CLIP-L/T5 files plus tokenizers, built once per session."""
    from fluxgym.tiny_flux import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"), seed=0)
