"""The New LoRA settings: parsed and checked field by field, then by the trainer's own parser.

`TrainForm.from_mapping` turns JSON or form values into typed settings, refusing control characters
and wrong types with a `FieldError` that names the field. `preflight` builds the exact trainer argv
(`fluxgym.generate` + `fluxgym.script`, nothing written) and runs it through the trainer's parser and
settings checks, so a bad advanced value fails here with the trainer's own message, before a job exists.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fluxgym.generate import GenerateOptions, build_request, render_files
from fluxgym.models import ModelError
from fluxgym.naming import LoraNameError
from fluxgym.presets import PresetError
from fluxgym.script import build_argv
from fluxgym.status import checkpoint_validation

log = logging.getLogger(__name__)

SETTINGS_FORMAT = "fluxgym-ui-settings"


class FieldError(ValueError):
    """A value the UI or API refuses; `field` is the name of the input (JSON key) it came from."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name

    def to_json(self) -> dict:
        return {"error": str(self), "field": self.field}


@dataclass
class TrainForm:
    """What the New LoRA page and `POST /api/jobs` accept (names are the API's JSON keys)."""

    name: str = ""
    trigger: str = ""
    images_dir: str = ""  # a folder on the server; the page may upload files instead
    vram: str = "20G"
    base_model: str = "flux-dev"
    epochs: int = 16
    save_every: int = 4
    keep_last: int = 2  # state folders kept (the trainer rotates older ones away)
    checkpointing: bool = True
    repeats: int = 10
    resolution: int | None = None  # None: the preset's
    lr: str = "8e-4"
    rank: int = 4
    seed: int = 42
    workers: int | None = None  # None: the preset's
    sample_prompts: str = ""  # one prompt per line; empty: the trigger
    sample_every: int = 0
    extra: list[str] = field(default_factory=list)  # trainer arguments, one argv element each

    @classmethod
    def from_mapping(cls, data: dict) -> "TrainForm":
        if not isinstance(data, dict):
            raise FieldError("body", "expected a JSON object with the LoRA settings")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FieldError(unknown[0], f"unknown field '{unknown[0]}'; known fields: {', '.join(known)}")
        form = cls()
        for key, value in data.items():
            setattr(form, key, _coerce(key, value, getattr(cls(), key)))
        form.check()
        return form

    def check(self) -> None:
        if not self.name.strip():
            raise FieldError("name", "name is empty: give the LoRA a name")
        for key in ("name", "trigger", "images_dir", "vram", "base_model", "lr"):
            _no_control(key, getattr(self, key))
        for i, line in enumerate(self.sample_prompts.split("\n")):
            _no_control("sample_prompts", line.rstrip("\r"), f"line {i + 1}")
        for i, arg in enumerate(self.extra):
            _no_control("extra", arg, f"item {i + 1}")
        for key, low in (("epochs", 1), ("save_every", 1), ("keep_last", 1), ("repeats", 1), ("rank", 1),
                         ("sample_every", 0)):
            if getattr(self, key) < low:
                raise FieldError(key, f"{key} must be at least {low}, got {getattr(self, key)}")
        if self.workers is not None and self.workers < 0:
            raise FieldError("workers", f"workers must be at least 0, got {self.workers}")

    def to_json(self) -> dict:
        return asdict(self)

    def options(self, root: Path, sample_prompts_file: Path | None = None) -> GenerateOptions:
        extra = list(self.extra)
        if self.checkpointing:
            extra = ["--save_last_n_epochs_state", str(self.keep_last), *extra]  # later flags win
        return GenerateOptions(
            name=self.name, vram=self.vram, root=Path(root), trigger=self.trigger or None,
            base_model=self.base_model, epochs=self.epochs, save_every=self.save_every, repeats=self.repeats,
            resolution=self.resolution, lr=self.lr, rank=self.rank, seed=self.seed, workers=self.workers,
            sample_prompts=sample_prompts_file, sample_every=self.sample_every, checkpointing=self.checkpointing,
            extra=extra)

    def prompts_text(self) -> str:
        text = "\n".join(line.rstrip("\r") for line in self.sample_prompts.split("\n")).strip()
        return (text or self.trigger or self.name) + "\n"


def _no_control(key: str, value: str, where: str = "") -> None:
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127 or c in "\u2028\u2029"]
    if bad:
        what = "a line break" if bad[0] in "\r\n\u2028\u2029" else f"the control character U+{ord(bad[0]):04X}"
        at = f" ({where})" if where else ""
        raise FieldError(key, f"{key}{at} contains {what}; remove it (one line, printable characters only)")


def _coerce(key: str, value, default):
    if key == "extra":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FieldError("extra", "extra must be a list of strings, one trainer argument each")
        return list(value)
    if key == "checkpointing":
        if not isinstance(value, bool):
            raise FieldError(key, f"{key} must be true or false, got {value!r}")
        return value
    if key in ("resolution", "workers") and value in (None, ""):
        return None
    if isinstance(default, int) or key in ("resolution", "workers"):
        if isinstance(value, bool):
            raise FieldError(key, f"{key} must be a whole number, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise FieldError(key, f"{key} must be a whole number, got {value!r}") from None
        if not isinstance(value, int):
            raise FieldError(key, f"{key} must be a whole number, got {value!r}")
        return value
    if key == "lr" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    if not isinstance(value, str):
        raise FieldError(key, f"{key} must be text, got {value!r}")
    return value


class TrainerArgumentError(ValueError):
    """The trainer's own parser or settings check refused the argv (its message, unchanged)."""


def trainer_parser() -> argparse.ArgumentParser:
    """The full parser of sd-scripts/flux_train_network.py, whose errors raise instead of exiting."""
    checkpoint_validation()  # puts this repository's sd-scripts/ on the import path
    module = importlib.import_module("flux_train_network")
    parser = module.setup_parser()

    def _raise(message: str):
        raise TrainerArgumentError(message)

    parser.error = _raise  # argparse calls self.error for every bad value; exiting would end the UI
    return parser


def check_with_trainer(argv: list[str]) -> argparse.Namespace:
    """Parse argv with the trainer's parser and run its settings checks (no model or file is opened)."""
    ns = trainer_parser().parse_args(argv)
    settings = importlib.import_module("library.settings")
    probe = argparse.Namespace(**vars(ns))
    probe.sample_prompts = None  # written by generate just before the job; existence is not the question here
    try:
        settings.settings_from_args(probe)
        # The range checks the trainer's preflight runs first thing (--network_dim 0 was queued, then refused).
        importlib.import_module("library.preflight").check_numbers(dict(vars(probe)))
    except ValueError as exc:
        raise TrainerArgumentError(str(exc)) from exc
    return ns


@dataclass(frozen=True)
class Preflight:
    argv: list[str]
    files: dict[str, str]  # train.sh / dataset.toml / ... text as it will be written


def preflight(form: TrainForm, root: Path) -> Preflight:
    """Every check short of the dataset: naming, preset, model key, numbers, then the trainer's parser."""
    opts = form.options(root)
    try:
        req, paths, _ = build_request(opts, check_dataset=False)
    except LoraNameError as exc:
        raise FieldError("name", str(exc)) from exc
    except PresetError as exc:
        raise FieldError("vram", str(exc)) from exc
    except ModelError as exc:
        raise FieldError("base_model", str(exc)) from exc
    except ValueError as exc:  # GenerateError names the CLI flag: map it back to the field
        msg = str(exc)
        flag = msg.split()[0].strip("-:").replace("-", "_") if msg.startswith("--") else "body"
        raise FieldError(flag, msg) from exc
    argv = build_argv(req)
    try:
        check_with_trainer(argv)
    except TrainerArgumentError as exc:
        raise FieldError("extra", f"the trainer refuses these settings: {exc}") from exc
    return Preflight(argv, render_files(req, paths, form.prompts_text(), form.repeats))


def settings_file_text(form: TrainForm) -> str:
    return json.dumps({"format": SETTINGS_FORMAT, "version": 1, "settings": form.to_json()}, indent=2) + "\n"


def load_settings_file(text: str) -> TrainForm:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FieldError("settings_file", f"not a settings file (JSON expected): {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
        raise FieldError("settings_file", f"not a FluxGym settings file (format: {SETTINGS_FORMAT} expected)")
    return TrainForm.from_mapping(data.get("settings") or {})
