"""Fixtures for the web UI tests: a project root, the JSON API in-process, a real server subprocess.

The browser tests need Debian's chromium (installed by setup.sh); without it they fail with a message
saying so instead of skipping, so CI can never pass them silently.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_images(folder: Path, n: int = 4, size: int = 96) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (40 + 50 * i, 90, 200 - 40 * i))
        ImageDraw.Draw(im).ellipse((10 + 4 * i, 12, 60 + 4 * i, 70), fill=(250, 250, 250))
        p = folder / f"img{i}.png"
        im.save(p)
        out.append(p)
    return out


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


class UIServer:
    """`python -m fluxgym ui` as a subprocess (own process group, so the test can kill it like a crash)."""

    def __init__(self, root: Path, port: int, log: Path, *extra: str):
        self.root, self.port, self.log, self.extra = root, port, log, extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> float:
        t0 = time.monotonic()
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxgym", "ui", "--root", str(self.root), "--port",
                                      str(self.port), *self.extra], cwd=REPO, env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"UI exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"UI did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the UI process only (as a crash would); the training it supervised keeps running."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


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
