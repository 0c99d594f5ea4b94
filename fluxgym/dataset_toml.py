"""`dataset.toml` in FluxGym's shape, written with real TOML escaping (tomli_w).

FluxGym interpolates the trigger into single quotes, so a `'` breaks the file; here every value goes
through a TOML serializer and round-trips exactly (quotes, backslashes, newlines, unicode).
"""

from __future__ import annotations

from pathlib import Path

import tomli_w


def dataset_config(image_dir: Path, *, resolution: int, trigger: str, repeats: int,
                   shuffle_caption: bool = False) -> dict:
    """The dataset config as data: same sections and keys as FluxGym's gen_toml. `shuffle_caption`
    follows the advanced panel's --shuffle_caption: a key in the file wins over the flag, so FluxGym's
    fixed `shuffle_caption = false` would silently switch the ticked option off."""
    return {
        "general": {"shuffle_caption": bool(shuffle_caption), "caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [
            {
                "resolution": int(resolution),
                "batch_size": 1,
                "keep_tokens": 1,
                "subsets": [
                    {"image_dir": str(image_dir), "class_tokens": trigger, "num_repeats": int(repeats)},
                ],
            }
        ],
    }


def render_dataset_toml(config: dict, header_lines: list[str]) -> str:
    """Header comment (one `#` line each; callers pass no user text with newlines) + the TOML body."""
    # A stray newline in a header line would start a TOML statement, so line breaks are flattened.
    safe = [line.replace("\r", " ").replace("\n", " ") for line in header_lines]
    header = "".join(f"# {line}".rstrip() + "\n" for line in safe)
    return header + "\n" + tomli_w.dumps(config)
