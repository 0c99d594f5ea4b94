"""Base-model catalogue (`models.yaml`, FluxGym's keys) and the weight files each entry needs.

Resolves a key or a path to absolute DiT / CLIP-L / T5-XXL / AE paths in FluxGym's folder layout,
lists missing files with the command that fetches each, and downloads with huggingface_hub on request
(lazily imported; never during generation or tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

MODELS_FILE = Path(__file__).with_name("models.yaml")
# FluxGym puts these two straight into models/unet/; every other repo gets models/unet/<repo>/.
TOP_LEVEL_KEYS = ("flux-dev", "flux-schnell")
# Where FluxGym fetches the shared encoders from (fluxgym-compat §3.3).
SHARED_FILES = {
    "clip_l": ("comfyanonymous/flux_text_encoders", "clip_l.safetensors", "clip"),
    "t5xxl": ("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors", "clip"),
    "ae": ("cocktailpeanut/xulf-dev", "ae.sft", "vae"),
}


class ModelError(ValueError):
    """Unknown base model, malformed models.yaml, or missing weight files."""


@dataclass(frozen=True)
class ModelFiles:
    key: str | None  # models.yaml key, or None when --base-model was a path
    unet: Path
    clip_l: Path
    t5xxl: Path
    ae: Path
    tokenizer_cache_dir: Path | None = None
    local: bool = False
    fetch: dict[str, str] = field(default_factory=dict, compare=False)  # file -> command that provides it

    def files(self) -> dict[str, Path]:
        out = {"unet": self.unet, "clip_l": self.clip_l, "t5xxl": self.t5xxl, "ae": self.ae}
        if self.tokenizer_cache_dir is not None:
            out["tokenizer_cache_dir"] = self.tokenizer_cache_dir
        return out


def load_models_yaml(path: Path = MODELS_FILE) -> dict[str, dict]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "file" in v for v in data.values()):
        raise ModelError(f"{path}: every entry must be a mapping with at least a 'file' key")
    return {str(k): v for k, v in data.items()}


def _unet_path(models_dir: Path, key: str, entry: dict) -> Path:
    if entry.get("local") or key in TOP_LEVEL_KEYS:
        return models_dir / "unet" / entry["file"]
    return models_dir / "unet" / entry.get("repo", key) / entry["file"]


def _looks_like_path(value: str) -> bool:
    return "/" in value and Path(value).suffix in (".safetensors", ".sft") or Path(value).exists()


def resolve_base_model(root: Path, base_model: str, models_yaml: Path = MODELS_FILE) -> ModelFiles:
    """Absolute paths of every file the trainer needs for a models.yaml key or a DiT file path."""
    root = Path(root).resolve()
    models_dir = root / "models"
    catalogue = load_models_yaml(models_yaml)
    entry: dict = {}
    if base_model in catalogue:
        key, entry = base_model, catalogue[base_model]
        unet = _unet_path(models_dir, key, entry)
    elif _looks_like_path(base_model):
        key, unet = None, Path(base_model).expanduser().resolve()
    else:
        raise ModelError(f"unknown base model '{base_model}': use a key of {models_yaml} "
                         f"({', '.join(catalogue)}) or a path to a FLUX .safetensors/.sft file")
    local = bool(entry.get("local"))
    fetch_cmd = ("python -m fluxgym demo" if local else f"python -m fluxgym models download {key}")
    paths = {}
    fetch = {}
    for name, (repo, filename, sub) in SHARED_FILES.items():
        paths[name] = models_dir / sub / entry.get(name, filename)
        fetch[str(paths[name])] = fetch_cmd if key else f"python -m fluxgym models download {name}"
    fetch[str(unet)] = fetch_cmd if key else "(your own file: check the --base-model path)"
    tok = entry.get("tokenizer_cache_dir")
    tok_path = (root / tok) if tok else None
    if tok_path is not None:
        fetch[str(tok_path)] = fetch_cmd
    return ModelFiles(key, unet, paths["clip_l"], paths["t5xxl"], paths["ae"], tok_path, local, fetch)


def missing_files(files: ModelFiles) -> list[Path]:
    return [p for p in files.files().values() if not p.exists()]


def check_model_files(files: ModelFiles) -> None:
    """Raise one error that lists every missing file and the command that provides it."""
    missing = missing_files(files)
    if missing:
        lines = [f"  - {p}\n      get it with: {files.fetch.get(str(p), 'python -m fluxgym models download KEY')}"
                 for p in missing]
        raise ModelError("missing model files:\n" + "\n".join(lines))


def download(root: Path, key: str, models_yaml: Path = MODELS_FILE) -> list[Path]:
    """Fetch a models.yaml entry's files (or one shared encoder: clip_l, t5xxl, ae) into models/."""
    root = Path(root).resolve()
    models_dir = root / "models"
    catalogue = load_models_yaml(models_yaml)
    jobs: list[tuple[str, str, Path]] = []  # (repo, filename, target)
    if key in SHARED_FILES:
        repo, filename, sub = SHARED_FILES[key]
        jobs.append((repo, filename, models_dir / sub / filename))
    elif key in catalogue:
        entry = catalogue[key]
        if entry.get("local"):
            raise ModelError(f"'{key}' is built locally, not downloaded: run `python -m fluxgym demo`")
        jobs.append((entry.get("repo", key), entry["file"], _unet_path(models_dir, key, entry)))
        jobs += [(r, f, models_dir / s / f) for r, f, s in SHARED_FILES.values()]
    else:
        raise ModelError(f"unknown model key '{key}': use one of {', '.join([*catalogue, *SHARED_FILES])}")
    from huggingface_hub import hf_hub_download  # lazy: heavy, and only needed online

    done = []
    for repo, filename, target in jobs:
        if target.exists():
            log.info("already present: %s", target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            hf_hub_download(repo_id=repo, filename=filename, local_dir=str(target.parent))
        done.append(target)
    return done
