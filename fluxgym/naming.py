"""LoRA names -> safe slugs, and the project folder layout built from them.

A slug contains only `a-z 0-9 - _`, so it is safe as a file name, a shell word and a TOML value.
Each slug is claimed by the first NAME that used it (`outputs/<slug>/.fluxgym-name`); a different
NAME that slugs the same is refused instead of overwriting another LoRA's outputs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

CLAIM_FILE = ".fluxgym-name"
_MAX_SLUG = 64


class LoraNameError(ValueError):
    """A NAME that gives no usable slug, or collides with another LoRA's slug."""


def slugify(name: str) -> str:
    """Lower-case ASCII slug: accents folded, every other run of characters becomes one `-`."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", folded).strip("-_")[:_MAX_SLUG].strip("-_")
    if not slug:
        raise LoraNameError(f"the name {name!r} has no letters or digits to build a folder name from; "
                         "use a name with at least one ASCII letter or digit")
    return slug


@dataclass(frozen=True)
class ProjectPaths:
    """Where one LoRA's files live under the project root (FluxGym's layout)."""

    root: Path
    slug: str

    @property
    def dataset_dir(self) -> Path:
        return self.root / "datasets" / self.slug

    @property
    def output_dir(self) -> Path:
        return self.root / "outputs" / self.slug

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def out(self, filename: str) -> Path:
        return self.output_dir / filename

    @property
    def final_lora(self) -> Path:
        return self.output_dir / f"{self.slug}.safetensors"


def project_paths(root: str | Path, name: str) -> ProjectPaths:
    return ProjectPaths(Path(root).resolve(), slugify(name))


def check_claim(paths: ProjectPaths, name: str) -> bool:
    """Raise when another NAME owns this slug; True when NAME already owns it."""
    claim = paths.out(CLAIM_FILE)
    if not claim.exists():
        return False
    owner = claim.read_text(encoding="utf-8")
    if owner != name:
        raise LoraNameError(f"the name {name!r} gives the folder name '{paths.slug}', which already belongs to "
                            f"{owner!r} ({paths.output_dir}); choose a different name")
    return True


def claim_slug(paths: ProjectPaths, name: str) -> None:
    """Record that NAME owns this slug; refuse when another NAME already does."""
    if not check_claim(paths, name):
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        paths.out(CLAIM_FILE).write_text(name, encoding="utf-8")


def resolve_existing(root: str | Path, name: str) -> ProjectPaths:
    """Paths for a LoRA that `generate` already set up (accepts the NAME or its slug)."""
    paths = project_paths(root, name)
    if not paths.output_dir.is_dir():
        raise LoraNameError(f"no generated LoRA '{paths.slug}' under {paths.root / 'outputs'}; "
                         f"run `python -m fluxgym generate {paths.slug} --vram ...` first")
    return paths
