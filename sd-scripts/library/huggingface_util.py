"""Upstream-compatible Hugging Face Hub helpers: `exists_repo`, `upload`, `list_dir`.

FluxGym's own app.py imports this module and calls `upload(args, src, ...)` from its "Publish" tab,
with the `huggingface_*` fields on an argparse-like namespace; the names and signatures match upstream
sd-scripts so that app keeps working on this trainer. huggingface_hub is imported lazily (the trainer
never needs it to train). Without network access, or with HF_HUB_OFFLINE set, every call fails with a
`HubUnavailableError` that says so and what to do, instead of a long stack of connection errors.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO, Union

from library.errors import UserError

logger = logging.getLogger(__name__)

OFFLINE_HINT = ("the Hugging Face Hub cannot be reached from this machine; upload from a machine with network "
                "access (copy the outputs/<name> folder there) or unset HF_HUB_OFFLINE")


class HubUnavailableError(UserError, RuntimeError):
    """The Hub cannot be reached (offline mode, no network, DNS or TLS failure)."""


class HubUploadError(UserError, ValueError):
    """An upload request that cannot work (no repository id, a missing source, a bad visibility)."""


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_api(token: str | None):
    if _offline_requested():
        raise HubUnavailableError(f"HF_HUB_OFFLINE is set: {OFFLINE_HINT}")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # an install without the Hub client
        raise HubUnavailableError(f"huggingface_hub is not installed ({exc}); `pip install huggingface_hub`") from exc
    return HfApi(token=token)


def _is_connection_error(exc: BaseException) -> bool:
    """True for failures that mean "no network" rather than "the Hub said no"."""
    seen = exc
    while seen is not None:
        name = type(seen).__module__ + "." + type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        # httpx/requests connection errors do not subclass the builtin ConnectionError.
        if any(k in name for k in ("ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_call(what: str, fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except HubUnavailableError:
        raise
    except Exception as exc:
        if _is_connection_error(exc):
            raise HubUnavailableError(f"{what} failed: {exc.__class__.__name__}: {exc}; {OFFLINE_HINT}") from exc
        raise


def exists_repo(repo_id: str, repo_type: str, revision: str = "main", token: str | None = None) -> bool:
    """True when the repository exists and is visible with this token; False when the Hub says it does not."""
    api = _hub_api(token)
    try:
        _hub_call(f"looking up {repo_id}", api.repo_info, repo_id=repo_id, revision=revision, repo_type=repo_type)
    except HubUnavailableError:
        raise
    except Exception as exc:  # RepositoryNotFoundError, RevisionNotFoundError, 401 on a private repo
        logger.debug("repo_info(%s) failed: %s", repo_id, exc)
        return False
    return True


def _visibility_private(value: str | None) -> bool:
    if value in (None, "", "public"):
        return False
    if value == "private":
        return True
    raise HubUploadError(f"--huggingface_repo_visibility must be 'public' or 'private', got {value!r}")


def _upload_now(api, repo_id: str, repo_type: str, src, path_in_repo: str) -> None:
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        _hub_call(f"uploading {src} to {repo_id}", api.upload_folder, repo_id=repo_id, repo_type=repo_type,
                  folder_path=str(src), path_in_repo=path_in_repo or None)
    else:
        _hub_call(f"uploading to {repo_id}", api.upload_file, repo_id=repo_id, repo_type=repo_type,
                  path_or_fileobj=str(src) if isinstance(src, Path) else src, path_in_repo=path_in_repo)


def upload(args: argparse.Namespace, src: Union[str, Path, bytes, BinaryIO], dest_suffix: str = "",
           force_sync_upload: bool = False) -> None:
    """Upload a file, a folder or bytes to `args.huggingface_repo_id`, creating the repository if needed.

    Fields read from `args` (upstream's names): huggingface_repo_id, huggingface_repo_type (default
    "model"), huggingface_token, huggingface_path_in_repo (+ `dest_suffix`), huggingface_repo_visibility
    ("public"/"private", for a new repository) and async_upload (upload in a background thread unless
    `force_sync_upload`).
    """
    repo_id = getattr(args, "huggingface_repo_id", None)
    if not repo_id:
        raise HubUploadError("--huggingface_repo_id is empty: give the repository as `user/name`")
    repo_type = getattr(args, "huggingface_repo_type", None) or "model"
    token = getattr(args, "huggingface_token", None)
    path_in_repo = (getattr(args, "huggingface_path_in_repo", None) or "") + dest_suffix
    private = _visibility_private(getattr(args, "huggingface_repo_visibility", None))
    if isinstance(src, (str, Path)) and not Path(src).exists():
        raise HubUploadError(f"upload source not found: {src}")
    if isinstance(src, (str, Path)) and Path(src).is_file() and not path_in_repo:
        path_in_repo = Path(src).name  # the Hub needs a file name; upstream callers pass it in dest_suffix
    api = _hub_api(token)
    if not exists_repo(repo_id, repo_type, token=token):
        _hub_call(f"creating {repo_id}", api.create_repo, repo_id=repo_id, repo_type=repo_type, private=private)
    if getattr(args, "async_upload", False) and not force_sync_upload:
        def _background() -> None:
            try:
                _upload_now(api, repo_id, repo_type, src, path_in_repo)
            except Exception:  # a background upload must not end training; say what failed
                logger.exception("background upload to %s failed", repo_id)

        threading.Thread(target=_background, name="hf-upload", daemon=True).start()
        return
    _upload_now(api, repo_id, repo_type, src, path_in_repo)


def list_dir(repo_id: str, subfolder: str, repo_type: str, revision: str = "main", token: str | None = None) -> list:
    """Entries of a repository below `subfolder` (what upstream's resume-from-Hub code walks)."""
    api = _hub_api(token)
    entries = _hub_call(f"listing {repo_id}", api.list_repo_tree, repo_id=repo_id, path_in_repo=subfolder or None,
                        repo_type=repo_type, revision=revision, recursive=True)
    return [e for e in entries if getattr(e, "path", "").startswith(subfolder or "")]
