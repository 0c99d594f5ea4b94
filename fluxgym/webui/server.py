"""`python -m fluxgym ui`: the Gradio pages and the JSON API on one port, hosting the job Worker.

Binds to 127.0.0.1 unless told otherwise; any other host needs --auth or --auth-file (the UI starts
training processes and reads files on this machine). Exit codes: 0 stopped normally, 2 bad usage
(message names the option), 1 could not start (the port is taken, the job store cannot be opened).
"""

from __future__ import annotations

import argparse
import base64
import hmac
import logging
import os
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fluxgym ui", description="FluxGym web UI and JSON API.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (pages and API)")
    auth.add_argument("--auth-file", type=Path, metavar="F", help="file with one USER:PASSWORD per line")
    p.add_argument("--root", type=Path, default=None,
                   help="project root holding models/, datasets/, outputs/ (default: $FLUXGYM_ROOT or this checkout)")
    p.add_argument("--no-worker", action="store_true", help="do not run jobs in this process (another worker does)")
    return p


def parse_auth(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where}: expected USER:PASSWORD with both parts non-empty")
    return user, password


def load_auth(a: argparse.Namespace) -> list[tuple[str, str]]:
    if a.auth:
        return [parse_auth(a.auth, "--auth")]
    if a.auth_file:
        try:
            lines = a.auth_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"--auth-file {a.auth_file}: cannot read it ({exc.strerror})") from exc
        pairs = [parse_auth(line, f"--auth-file {a.auth_file} line {i + 1}")
                 for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
        if not pairs:
            raise ValueError(f"--auth-file {a.auth_file}: no USER:PASSWORD line in it")
        return pairs
    return []


def check_host(host: str, auth: list) -> None:
    if host not in LOCAL_HOSTS and not auth:
        raise ValueError(f"--host {host} makes the UI reachable from other machines, and it can start training "
                         "processes and read files here; add --auth USER:PASSWORD or --auth-file F "
                         "(or keep the default --host 127.0.0.1)")


def _basic_ok(header: str | None, auth: list[tuple[str, str]]) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return any(hmac.compare_digest(user, u) and hmac.compare_digest(password, p) for u, p in auth)


def create_app(root: Path, *, worker=None, auth: list[tuple[str, str]] | None = None):
    """The FastAPI app: /api/* (JSON) and the Gradio pages at /."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from an offline machine
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from fluxgym.webui.api import build_router, install_error_handlers
    from fluxgym.webui.pages import build_blocks

    app = FastAPI(title="FluxGym", docs_url=None, redoc_url=None)
    if auth:
        @app.middleware("http")
        async def api_auth(request: Request, call_next):
            if request.url.path.startswith("/api/") and not _basic_ok(request.headers.get("authorization"), auth):
                return JSONResponse({"error": "login required: send HTTP Basic auth (the --auth user)",
                                     "field": "authorization"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="fluxgym"'})
            return await call_next(request)
    install_error_handlers(app)
    app.include_router(build_router(root, worker))
    # The trainer's settings check imports torch (seconds); do it now so the first keystroke's preview is quick.
    threading.Thread(target=_warm_up, name="fluxgym-ui-warmup", daemon=True).start()
    blocks = build_blocks(root)
    return gr.mount_gradio_app(app, blocks, path="", auth=auth or None,
                               allowed_paths=[str(root / "outputs")], show_error=True,
                               footer_links=[], theme=gr.themes.Soft(), css=_CSS)


def _warm_up() -> None:
    try:
        from fluxgym.webui.form import check_with_trainer

        check_with_trainer([])
    except Exception:  # the empty argv is refused; only the imports matter
        pass


_CSS = ("#jobs_table table {font-size: 0.9em} .gradio-container {max-width: 1400px !important} "
        "#job_log textarea {font-family: ui-monospace, monospace; font-size: 0.85em}")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        auth = load_auth(a)
        check_host(a.host, auth)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from fluxgym.generate import REPO_ROOT

    root = (a.root or Path(os.environ.get("FLUXGYM_ROOT") or REPO_ROOT)).resolve()
    import uvicorn

    worker = None
    try:
        if not a.no_worker:
            from fluxgym.jobs.worker import Worker

            worker = Worker(root)
            worker.start()
        app = create_app(root, worker=worker, auth=auth)
        print(f"FluxGym UI on http://{a.host}:{a.port}  (project root {root})", flush=True)
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if worker is not None:
            worker.close()
    return EXIT_OK
