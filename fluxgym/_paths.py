"""How the project's parts import each other: the one place that makes `sd-scripts/` importable.

The trainer lives in `sd-scripts/` as a script directory (its modules import each other as `library.*`,
like upstream's), so it is not an installed package. Code in `fluxgym/` and `tools/` that needs one of
its stdlib-only modules (heartbeat, console markers, checkpoint validation, fault injection) calls
`use_sd_scripts()` once, here, instead of editing `sys.path` itself. No editable install: several git
worktrees may share one virtual environment, and each must import its own checkout.
Entry scripts run from `tools/` first add the repository root (so `import fluxgym` works), nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SD_SCRIPTS = REPO_ROOT / "sd-scripts"


def use_sd_scripts() -> Path:
    """Put this checkout's `sd-scripts/` first on the import path (idempotent); returns the folder."""
    path = str(SD_SCRIPTS)
    if path not in sys.path:
        # First, so a `library` package installed elsewhere (an upstream sd-scripts) never shadows ours.
        sys.path.insert(0, path)
    return SD_SCRIPTS
