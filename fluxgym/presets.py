"""VRAM presets as versioned data.

Loads and validates `presets.yaml` (next to this module) into frozen `Preset` dataclasses; an unknown
preset name or a malformed file is a clear error. `presets_table()` renders the README table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
SUPPORTED_FORMAT_VERSION = 1
MIXED_PRECISIONS = ("no", "fp16", "bf16")


class PresetError(ValueError):
    """A preset name that does not exist, or a presets file that does not validate."""


@dataclass(frozen=True)
class PresetFlag:
    args: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Preset:
    name: str
    version: int
    min_vram_gb: int
    description: str
    mixed_precision: str
    fp8_base: bool
    fp8_why: str
    highvram: bool
    gradient_checkpointing: bool
    persistent_workers: bool
    resolution: int
    workers: int
    block: tuple[PresetFlag, ...]

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def block_args(self) -> list[str]:
        return [a for flag in self.block for a in flag.args]


def _req(entry: dict, key: str, typ: type, where: str):
    if key not in entry:
        raise PresetError(f"{PRESETS_FILE}: {where} is missing key '{key}'")
    value = entry[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise PresetError(f"{PRESETS_FILE}: {where}.{key} must be {typ.__name__}, got {value!r}")
    return value


def _parse_preset(name: str, entry: dict) -> Preset:
    where = f"presets.{name}"
    if not isinstance(entry, dict):
        raise PresetError(f"{PRESETS_FILE}: {where} must be a mapping")
    block = []
    for i, flag in enumerate(_req(entry, "block", list, where)):
        args = _req(flag, "args", list, f"{where}.block[{i}]")
        if not args or not all(isinstance(a, str) for a in args) or not args[0].startswith("--"):
            raise PresetError(f"{PRESETS_FILE}: {where}.block[{i}].args must be a flag followed by its values")
        block.append(PresetFlag(tuple(args), _req(flag, "why", str, f"{where}.block[{i}]")))
    preset = Preset(
        name=name,
        version=_req(entry, "version", int, where),
        min_vram_gb=_req(entry, "min_vram_gb", int, where),
        description=_req(entry, "description", str, where),
        mixed_precision=_req(entry, "mixed_precision", str, where),
        fp8_base=_req(entry, "fp8_base", bool, where),
        fp8_why=_req(entry, "fp8_why", str, where),
        highvram=_req(entry, "highvram", bool, where),
        gradient_checkpointing=_req(entry, "gradient_checkpointing", bool, where),
        persistent_workers=_req(entry, "persistent_workers", bool, where),
        resolution=_req(entry, "resolution", int, where),
        workers=_req(entry, "workers", int, where),
        block=tuple(block),
    )
    if preset.mixed_precision not in MIXED_PRECISIONS:
        raise PresetError(f"{PRESETS_FILE}: {where}.mixed_precision must be one of {MIXED_PRECISIONS}")
    if preset.resolution % 16:
        raise PresetError(f"{PRESETS_FILE}: {where}.resolution must be a multiple of 16 (FLUX packs 2x2 latents)")
    return preset


@functools.lru_cache(maxsize=None)
def load_presets(path: Path = PRESETS_FILE) -> dict[str, Preset]:
    """All presets from the data file, in file order."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != "fluxgym-presets":
        raise PresetError(f"{path}: not a fluxgym presets file (format: fluxgym-presets)")
    if data.get("format_version") != SUPPORTED_FORMAT_VERSION:
        raise PresetError(f"{path}: format_version {data.get('format_version')!r} is not supported")
    return {str(name): _parse_preset(str(name), entry) for name, entry in data["presets"].items()}


def preset_names() -> list[str]:
    return list(load_presets())


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise PresetError(f"unknown VRAM preset '{name}'; choose one of: {', '.join(presets)}")
    return presets[name]


def presets_table() -> str:
    """Markdown table: one row per preset flag with the reason it is there (for the README)."""
    rows = ["| preset | flag | why |", "|---|---|---|"]
    for p in load_presets().values():
        rows.append(f"| {p.label} | fp8_base={'on' if p.fp8_base else 'off'}, "
                    f"--mixed_precision {p.mixed_precision} | {p.fp8_why} |")
        for flag in p.block:
            rows.append(f"| {p.label} | `{' '.join(flag.args)}` | {flag.why} |")
    return "\n".join(rows)
