"""FluxGym's own app.py on our sd-scripts: what it does at import and when it builds its panels.

FluxGym puts sd-scripts/ on sys.path, imports `library.flux_train_utils`, `library.huggingface_util`
and `train_network`, builds a parser from `train_network.setup_parser()` +
`flux_train_utils.add_flux_train_arguments()`, and turns every action it does not set itself into a
checkbox (no type: a switch) or a textbox (`--flag value`), labelled with the first option string and
described by the help text. Its Publish tab calls `huggingface_util.upload(args, folder, ...)`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SD_SCRIPTS = REPO / "sd-scripts"

# What FluxGym's gen_sh emits itself, so its panel leaves them out (fluxgym-compat §4.3).
FLUXGYM_BASIC_DESTS = {
    "pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "cache_latents_to_disk", "save_model_as", "sdpa",
    "persistent_data_loader_workers", "max_data_loader_n_workers", "seed", "gradient_checkpointing",
    "mixed_precision", "save_precision", "network_module", "network_dim", "learning_rate",
    "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "fp8_base", "highvram", "max_train_epochs",
    "save_every_n_epochs", "dataset_config", "output_dir", "output_name", "timestep_sampling",
    "discrete_flow_shift", "model_prediction_type", "guidance_scale", "loss_type", "optimizer_type",
    "optimizer_args", "lr_scheduler", "sample_prompts", "sample_every_n_steps", "max_grad_norm", "split_mode",
    "network_args",
}

# Run in a fresh interpreter from a foreign cwd, with only sd-scripts/ on the path, as app.py does.
APP_IMPORT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from library import flux_train_utils, huggingface_util
    import train_network
    parser = train_network.setup_parser()
    flux_train_utils.add_flux_train_arguments(parser)
    rows = []
    for a in sorted(parser._actions, key=lambda a: a.dest):
        if a.dest == "help":
            continue
        rows.append({"dest": a.dest, "label": a.option_strings[0], "checkbox": a.type is None,
                     "nargs": a.nargs, "help": a.help, "const": a.const is not None})
    print(json.dumps({"rows": rows, "upload": callable(huggingface_util.upload),
                      "exists_repo": callable(huggingface_util.exists_repo)}))
""")


@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("fluxgym_app")
    out = subprocess.run([sys.executable, "-c", APP_IMPORT, str(SD_SCRIPTS)], cwd=cwd, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_app_imports_and_panel_has_every_flag_with_help(panel):
    assert panel["upload"] and panel["exists_repo"]
    rows = {r["dest"]: r for r in panel["rows"]}
    # The panel FluxGym shows: everything it does not emit itself, each labelled `--flag`.
    shown = {d: r for d, r in rows.items() if d not in FLUXGYM_BASIC_DESTS}
    assert len(shown) >= 40, sorted(shown)
    for dest, row in shown.items():
        assert row["label"].startswith("--"), row
        assert row["help"] is None or isinstance(row["help"], str)
    # Flags FluxGym users set from that panel (issues #126, #181, #192, #72) are all there.
    for dest in ("save_every_n_steps", "train_batch_size", "save_state", "resume", "lr_warmup_steps",
                 "network_alpha", "network_weights", "caption_extension", "apply_t5_attn_mask"):
        assert dest in shown, dest
    # The basic flags gen_sh writes must exist too, or its generated script would not parse.
    assert FLUXGYM_BASIC_DESTS - {"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                                  "split_mode"} <= set(rows)


def test_checkbox_rows_are_switches(panel):
    """A checkbox makes FluxGym emit the bare flag; that only parses when the flag takes no value."""
    for row in panel["rows"]:
        if row["checkbox"] and row["dest"] not in FLUXGYM_BASIC_DESTS:
            assert row["nargs"] == 0, f"{row['label']} has no type but takes a value: FluxGym would emit it bare"


def test_values_from_the_panel_parse_with_the_trainer(panel):
    """What FluxGym writes for each panel row (`--flag` or `--flag value`) parses with our trainer's parser."""
    sys.path.insert(0, str(SD_SCRIPTS))
    import flux_train_network

    parser = flux_train_network.setup_parser()
    samples = {"int": "3", "float": "0.5", "str": "x"}
    for row in panel["rows"]:
        if row["dest"] in FLUXGYM_BASIC_DESTS:
            continue
        action = parser._option_string_actions[row["label"]]
        if row["checkbox"]:
            argv = [row["label"]]
        else:
            kind = getattr(action.type, "__name__", "str")
            value = action.choices[-1] if action.choices else samples.get(kind, "3")
            argv = [row["label"], str(value)]
        ns = parser.parse_args(argv)
        assert getattr(ns, action.dest) not in (None, False), argv


def _args(**over) -> argparse.Namespace:
    base = dict(huggingface_repo_id="someone/lora", huggingface_repo_type="model", huggingface_token="tok",
                huggingface_path_in_repo="", huggingface_repo_visibility="public", async_upload=False)
    base.update(over)
    return argparse.Namespace(**base)


def test_upload_offline_is_a_clear_error(tmp_path, monkeypatch):
    from library import huggingface_util
    from library.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "x.safetensors").write_bytes(b"0")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*cannot be reached"):
        huggingface_util.upload(_args(), str(tmp_path))


def test_upload_without_network_is_a_clear_error(tmp_path, monkeypatch):
    """No route to the Hub (this machine): the error says so instead of a connection traceback."""
    import huggingface_hub
    from library import huggingface_util

    class NoNetwork:
        def __init__(self, token=None):
            pass

        def repo_info(self, **kw):
            raise huggingface_hub.errors.OfflineModeIsEnabled("network unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    with pytest.raises(huggingface_util.HubUnavailableError, match="cannot be reached"):
        huggingface_util.upload(_args(), str(tmp_path))


def test_upload_creates_repo_and_sends_the_folder(tmp_path, monkeypatch):
    """Online path as FluxGym's Publish tab uses it: a new private repo, then the whole output folder."""
    import huggingface_hub
    from library import huggingface_util

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def repo_info(self, **kw):
            raise huggingface_hub.errors.RepositoryNotFoundError("404", response=None)

        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

        def upload_file(self, **kw):
            calls.append(("upload_file", kw))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "lora.safetensors").write_bytes(b"0")
    huggingface_util.upload(_args(huggingface_repo_visibility="private"), str(tmp_path))
    assert ("init", "tok") in calls
    create = [kw for name, kw in calls if name == "create_repo"]
    assert create == [{"repo_id": "someone/lora", "repo_type": "model", "private": True}]
    folder = [kw for name, kw in calls if name == "upload_folder"]
    assert folder and folder[0]["folder_path"] == str(tmp_path) and folder[0]["repo_id"] == "someone/lora"
    calls.clear()
    huggingface_util.upload(_args(huggingface_path_in_repo="sub/"), tmp_path / "lora.safetensors",
                            dest_suffix="lora.safetensors")
    files = [kw for name, kw in calls if name == "upload_file"]
    assert files and files[0]["path_in_repo"] == "sub/lora.safetensors"
    with pytest.raises(huggingface_util.HubUploadError, match="huggingface_repo_visibility"):
        huggingface_util.upload(_args(huggingface_repo_visibility="secret"), str(tmp_path))
    with pytest.raises(huggingface_util.HubUploadError, match="not found"):
        huggingface_util.upload(_args(), str(tmp_path / "missing"))
