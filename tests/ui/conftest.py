"""Fixtures for the web UI tests: a project root, the JSON API in-process, a real server subprocess.

The browser tests need Debian's chromium (installed by setup.sh); without it they fail with a message
saying so instead of skipping, so CI can never pass them silently.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from ui_helpers import CHROMIUM, REPO


@pytest.fixture
def api_root(tmp_path) -> Path:
    """A project root with placeholder demo model files (no training runs: there is no worker)."""
    sys.path.insert(0, str(REPO / "tests" / "fluxgym"))
    from fg_helpers import fake_models

    root = tmp_path / "proj"
    root.mkdir()
    fake_models(root, "demo")
    return root


@pytest.fixture
def client(api_root):
    """The JSON API in-process (the router alone: no pages, no worker)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from fluxgym.webui.api import build_router, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_router(api_root))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Screenshots, the server log and timings; outside pytest's rotating tmp folders so they stay."""
    d = Path(os.environ.get("FLUXGYM_UI_ARTIFACTS") or Path(tempfile.gettempdir()) / "fluxgym-ui-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.png"):
        old.unlink()
    print(f"\n[ui tests] screenshots and logs are written to {d}")
    return d


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; run `bash setup.sh` "
                    "(it runs `apt-get install -y chromium`)", pytrace=False)
    return CHROMIUM
