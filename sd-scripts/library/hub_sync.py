"""Hugging Face Hub uploads after each save and `--resume_from_huggingface`, through library.huggingface_util.

- After every saved LoRA file (and, with --save_state_to_huggingface, every state folder) the file is uploaded
  to --huggingface_repo_id under --huggingface_path_in_repo, as upstream. The final save is uploaded
  synchronously even with --async_upload (upstream's force_sync_upload), so the run ends with it on the Hub.
- An upload never ends or stalls training: a failure is a warning naming the file (it is saved locally), and a
  synchronous upload waits at most --save_timeout seconds before training goes on without it.
- When the preflight (library.option_settings) found the Hub offline, nothing is attempted.
- `--resume user/name/path[:revision[:type]]` with --resume_from_huggingface downloads that state folder into
  OUTPUT_DIR/.hub-resume/ first (upstream's syntax).
"""
from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import Callable

from library.settings import HubSettings, SettingsError

log = logging.getLogger(__name__)


class HubSync:
    """Uploads a run's saves; `upload` is huggingface_util.upload (replaceable in tests)."""

    def __init__(self, settings: HubSettings, *, timeout: float | None = None, upload: Callable | None = None):
        self.s = settings
        self.timeout = timeout or None
        if upload is None:
            from library import huggingface_util

            upload = huggingface_util.upload
        self._upload = upload
        self.uploaded: list[str] = []  # repository paths handed to the uploader, for the log and tests
        self.failed: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.s.uploads

    def upload_args(self) -> argparse.Namespace:
        """The namespace huggingface_util.upload reads (upstream's field names)."""
        return argparse.Namespace(
            huggingface_repo_id=self.s.repo_id, huggingface_repo_type=self.s.repo_type,
            huggingface_path_in_repo=self.s.path_in_repo, huggingface_token=self.s.token,
            huggingface_repo_visibility=self.s.visibility, async_upload=self.s.async_upload)

    def _dest(self, name: str) -> str:
        # huggingface_util appends this to --huggingface_path_in_repo; without one the bare name is the path
        return f"/{name}" if self.s.path_in_repo else name

    def after_save(self, lora_file: Path, state_dir: Path | None = None, *, final: bool = False) -> None:
        if not self.enabled:
            return
        targets = [Path(lora_file)]
        if state_dir is not None and self.s.save_state:
            targets.append(Path(state_dir))
        for path in targets:
            self._send(path, force_sync=final)

    def _send(self, path: Path, *, force_sync: bool) -> None:
        dest = self._dest(path.name)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._upload(self.upload_args(), path, dest, force_sync_upload=force_sync)
            except Exception as exc:  # noqa: BLE001 - reported below; an upload must not end training
                errors.append(exc)

        print(f"uploading to huggingface: {self.s.repo_id}/{(self.s.path_in_repo or '')}{dest}", flush=True)
        worker = threading.Thread(target=run, name="hub-upload-call", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            self.failed.append(str(path))
            log.warning("upload of %s did not finish within %s s (--save_timeout); training goes on, the file is "
                        "saved locally", path, self.timeout)
        elif errors:
            self.failed.append(str(path))
            log.warning("upload of %s failed (%s: %s); the file is saved locally", path,
                        type(errors[0]).__name__, errors[0])
        else:
            self.uploaded.append(dest)


def parse_hub_resume(spec: str) -> tuple[str, str, str | None, str]:
    """`user/name/path[:revision[:repo_type]]` -> (repo_id, path_in_repo, revision, repo_type), as upstream."""
    parts = spec.strip("/").split("/")
    if len(parts) < 3 or not all(parts[:2]):
        raise SettingsError(f"--resume {spec!r} with --resume_from_huggingface: use user/name/path/to/state-folder"
                            "[:revision]")
    repo_id = "/".join(parts[:2])
    path, revision, repo_type = "/".join(parts[2:]), None, "model"
    if ":" in path:
        pieces = path.split(":")
        if len(pieces) not in (2, 3):
            raise SettingsError(f"--resume {spec!r}: too many ':' (use path:revision or path:revision:type)")
        path, revision = pieces[0], pieces[1] or None
        if len(pieces) == 3:
            repo_type = pieces[2] or "model"
    return repo_id, path, revision, repo_type


def download_state(settings: HubSettings, spec: str, output_dir: Path, *, download: Callable | None = None) -> Path:
    """Fetch the state folder named by `spec` into OUTPUT_DIR/.hub-resume and return its local path."""
    repo_id, path, revision, repo_type = parse_hub_resume(spec)
    if download is None:
        from huggingface_hub import snapshot_download as download
    local_root = Path(output_dir) / ".hub-resume"
    print(f"downloading state {path} from huggingface {repo_id}" + (f"@{revision}" if revision else ""), flush=True)
    try:
        download(repo_id=repo_id, repo_type=repo_type, revision=revision, allow_patterns=[f"{path}/*"],
                 local_dir=str(local_root), token=settings.token)
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise SettingsError(f"--resume_from_huggingface: cannot download {path} from {repo_id}: "
                            f"{type(exc).__name__}: {exc}") from exc
    local = local_root / path
    if not local.is_dir():
        raise SettingsError(f"--resume_from_huggingface: {repo_id} has no state folder {path}")
    return local
