"""Hub uploads after saves and --resume_from_huggingface, with the Hub transport mocked (no network)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from library import huggingface_util, option_settings
from library.hub_sync import HubSync, download_state, parse_hub_resume
from library.settings import HubSettings, SettingsError

ONLINE = HubSettings(repo_id="me/lora", path_in_repo="runs/a", save_state=True, online=True)


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would have been sent."""

    def __init__(self, existing: bool = False):
        self.calls: list[tuple] = []
        self.existing = existing

    def repo_info(self, repo_id, revision=None, repo_type=None):
        self.calls.append(("repo_info", repo_id))
        if not self.existing:
            raise LookupError("404")

    def create_repo(self, repo_id, repo_type=None, private=False):
        self.calls.append(("create_repo", repo_id, repo_type, private))
        self.existing = True

    def upload_file(self, repo_id, repo_type, path_or_fileobj, path_in_repo):
        self.calls.append(("upload_file", repo_id, path_in_repo, open(path_or_fileobj, "rb").read()))

    def upload_folder(self, repo_id, repo_type, folder_path, path_in_repo):
        self.calls.append(("upload_folder", repo_id, path_in_repo, sorted(p.name for p in Path(folder_path).iterdir())))


@pytest.fixture
def fake_api(monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(huggingface_util, "_hub_api", lambda token: api)
    return api


def test_uploads_lora_and_state_through_huggingface_util(fake_api, tmp_path):
    lora = tmp_path / "tiny-step00000002.safetensors"
    lora.write_bytes(b"weights")
    state = tmp_path / "tiny-step00000002-state"
    state.mkdir()
    (state / "model.safetensors").write_bytes(b"s")
    sync = HubSync(replace_settings(visibility="private"))
    sync.after_save(lora, state)
    kinds = [c[0] for c in fake_api.calls]
    assert kinds[:2] == ["repo_info", "create_repo"] and fake_api.calls[1][3] is True  # private repo made
    assert ("upload_file", "me/lora", "runs/a/tiny-step00000002.safetensors", b"weights") in fake_api.calls
    assert ("upload_folder", "me/lora", "runs/a/tiny-step00000002-state", ["model.safetensors"]) in fake_api.calls
    assert sync.uploaded == ["/tiny-step00000002.safetensors", "/tiny-step00000002-state"] and not sync.failed


def replace_settings(**kw) -> HubSettings:
    from dataclasses import replace

    return replace(ONLINE, **kw)


def test_without_path_in_repo_the_file_lands_at_the_root_and_state_only_when_asked(fake_api, tmp_path):
    lora = tmp_path / "last.safetensors"
    lora.write_bytes(b"x")
    HubSync(replace_settings(path_in_repo=None, save_state=False)).after_save(lora, tmp_path)
    uploads = [c for c in fake_api.calls if c[0].startswith("upload")]
    assert uploads == [("upload_file", "me/lora", "last.safetensors", b"x")]


def test_offline_preflight_means_no_upload_attempt(tmp_path):
    calls = []
    sync = HubSync(replace_settings(online=False), upload=lambda *a, **k: calls.append(a))
    sync.after_save(tmp_path / "x.safetensors")
    assert calls == [] and not sync.enabled


def test_failed_or_stuck_upload_warns_and_training_goes_on(tmp_path, caplog):
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"x")

    def broken(*args, **kwargs):
        raise ConnectionError("network down")

    sync = HubSync(ONLINE, upload=broken)
    sync.after_save(lora)
    assert sync.failed == [str(lora)] and "network down" in caplog.text
    release = threading.Event()
    stuck = HubSync(ONLINE, timeout=0.3, upload=lambda *a, **k: release.wait(10))
    started = time.monotonic()
    stuck.after_save(lora)
    assert time.monotonic() - started < 3 and stuck.failed == [str(lora)]
    release.set()


def test_final_save_is_forced_synchronous(tmp_path):
    seen = []
    sync = HubSync(replace_settings(async_upload=True), upload=lambda args, src, dest, force_sync_upload: seen.append(
        (args.async_upload, force_sync_upload)))
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"x")
    sync.after_save(lora)
    sync.after_save(lora, final=True)
    assert seen == [(True, False), (True, True)]


def test_parse_hub_resume_upstream_syntax():
    assert parse_hub_resume("me/lora/runs/a/tiny-state") == ("me/lora", "runs/a/tiny-state", None, "model")
    assert parse_hub_resume("me/lora/st:v2") == ("me/lora", "st", "v2", "model")
    assert parse_hub_resume("me/lora/st:main:dataset") == ("me/lora", "st", "main", "dataset")
    with pytest.raises(SettingsError, match="--resume"):
        parse_hub_resume("me/lora")


def test_download_state_places_the_folder_locally(tmp_path):
    def fake_download(repo_id, repo_type, revision, allow_patterns, local_dir, token):
        assert (repo_id, allow_patterns) == ("me/lora", ["runs/tiny-state/*"])
        target = tmp_path / "out" / ".hub-resume" / "runs" / "tiny-state"
        target.mkdir(parents=True)
        (target / "checkpoint.json").write_text("{}")

    local = download_state(ONLINE, "me/lora/runs/tiny-state", tmp_path / "out", download=fake_download)
    assert local == tmp_path / "out" / ".hub-resume" / "runs" / "tiny-state" and (local / "checkpoint.json").is_file()
    with pytest.raises(SettingsError, match="no state folder"):
        download_state(ONLINE, "me/lora/other", tmp_path / "out", download=lambda **k: None)


def _settings(extra, monkeypatch, env_offline: bool, probe=None):
    import flux_train_network
    from library.settings import settings_from_args

    if env_offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(option_settings, "_probe_hub", lambda seconds=3.0: probe)
    base = ["--pretrained_model_name_or_path", "m", "--clip_l", "c", "--t5xxl", "t", "--ae", "a",
            "--dataset_config", "d.toml", "--output_dir", "o"]
    return settings_from_args(flux_train_network.setup_parser().parse_args(base + extra))


def test_preflight_says_offline_before_training(monkeypatch, capsys):
    s = _settings(["--huggingface_repo_id", "me/lora"], monkeypatch, env_offline=True)
    assert s.hub.repo_id == "me/lora" and not s.hub.online and not s.hub.uploads
    assert "cannot be reached (HF_HUB_OFFLINE is set)" in capsys.readouterr().out
    s = _settings(["--huggingface_repo_id", "me/lora"], monkeypatch, env_offline=False, probe="OSError: no route")
    assert not s.hub.online
    s = _settings(["--huggingface_repo_id", "me/lora", "--async_upload"], monkeypatch, env_offline=False, probe=None)
    assert s.hub.online and s.hub.uploads and s.hub.async_upload


@pytest.mark.parametrize("extra, needle", [
    (["--huggingface_repo_id", "nouser"], "user/name"),
    (["--huggingface_repo_id", "me/lora", "--huggingface_repo_visibility", "secret"], "visibility"),
    (["--resume_from_huggingface", "--resume", "me/lora/st"], "--huggingface_repo_id"),
    (["--huggingface_repo_id", "me/lora", "--resume_from_huggingface", "--resume", "me/lora/st"], "reached"),
])
def test_hub_flag_errors_name_the_flag(monkeypatch, extra, needle):
    with pytest.raises(SettingsError, match=needle):
        _settings(extra, monkeypatch, env_offline=True)
