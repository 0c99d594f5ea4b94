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
# Unicode categories refused in a NAME or trigger: control characters (newline, tab, NUL, ESC, DEL, C1) and the
# line/paragraph separators, which str.splitlines() and many editors also treat as line breaks.
_REFUSED_CATEGORIES = {"Cc": "a control character", "Zl": "a line separator", "Zp": "a paragraph separator"}
_NAMED_CHARS = {"\n": "a line break (\\n)", "\r": "a carriage return (\\r)", "\t": "a tab (\\t)"}


class LoraNameError(ValueError):
    """A NAME that gives no usable slug, or collides with another LoRA's slug."""


class TextFieldError(ValueError):
    """A NAME or trigger with a line break or control character; `field` says which input it was."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_one_line(value: str, field: str) -> str:
    """Return `value` unchanged, or raise TextFieldError naming `field` and the first refused character.

    A trigger ends up as a caption, a `class_tokens` value and a line of sample_prompts.txt, where a line break
    silently splits it in two; a NAME is recorded in the slug claim file. Quotes, `$()`, backslashes and any other
    printable unicode are fine: every writer quotes or escapes them.
    """
    for index, char in enumerate(value):
        kind = _REFUSED_CATEGORIES.get(unicodedata.category(char))
        if kind is not None:
            what = _NAMED_CHARS.get(char, f"{kind} (U+{ord(char):04X})")
            raise TextFieldError(field, f"{field} contains {what} at character {index + 1}: it must be one line "
                                        "of text without control characters; remove it and try again")
    return value


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
    """Paths for NAME under `root`; a NAME with a line break or control character is refused (TextFieldError)."""
    return ProjectPaths(Path(root).resolve(), slugify(check_one_line(name, "NAME")))


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
