"""`--config_file` and `--output_config`, as upstream: a TOML whose values seed the namespace.

Sections are flattened; command-line flags override the file. Unlike upstream, a key that
is not a flag of this trainer is an error naming the key and the file, so a typo never
silently trains with a default.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from library.args import UNSUPPORTED_FLAGS, UNSUPPORTED_MESSAGE
from library.errors import BadFileError


class ConfigFileError(BadFileError):
    pass


def _known_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


def _flatten(table: dict, path: Path) -> dict:
    flat: dict = {}
    for key, value in table.items():
        if isinstance(value, dict):  # a section: its keys are flags
            for inner, inner_value in _flatten(value, path).items():
                flat[inner] = inner_value
        else:
            flat[key] = value
    return flat


def read_config_values(parser: argparse.ArgumentParser, config_path: str) -> dict:
    path = Path(config_path)
    if not path.suffix:
        path = path.with_suffix(".toml")
    if not path.is_file():
        raise ConfigFileError(f"--config_file {path}: file not found")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--config_file {path}: not valid TOML ({exc})") from exc
    values = _flatten(table, path)
    dests = _known_dests(parser)
    unsupported = {f.lstrip("-") for f in UNSUPPORTED_FLAGS}
    for key in values:
        if key in unsupported:
            raise ConfigFileError(f"--config_file {path}: key `{key}`: " + UNSUPPORTED_MESSAGE.format(
                flag="--" + key, reason=UNSUPPORTED_FLAGS["--" + key]))
        if key not in dests or key == "config_file":
            raise ConfigFileError(f"--config_file {path}: unknown key `{key}` (not a flag of this trainer); "
                                  "remove it or fix its spelling")
    return values


def parse_with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; when --config_file is given its values become defaults that argv overrides."""
    first = parser.parse_args(argv)
    if not getattr(first, "config_file", None) or getattr(first, "output_config", False):
        return first  # with --output_config the file is the destination, not a source
    try:
        values = read_config_values(parser, first.config_file)
    except ConfigFileError as exc:
        parser.error(str(exc))
    parser.set_defaults(**values)
    return parser.parse_args(argv)


def write_output_config(parser: argparse.ArgumentParser, ns: argparse.Namespace, path: Path) -> None:
    """Write the flags that differ from their defaults to a TOML (upstream's --output_config)."""
    import tomli_w

    if path.suffix != ".toml":
        path = path.with_name(path.name + ".toml")
    if path.exists():
        raise ConfigFileError(f"--config_file {path}: already exists; --output_config never overwrites a config "
                              "(choose a new name)")
    defaults = vars(parser.parse_args([]))
    values = {}
    for key, value in sorted(vars(ns).items()):
        if key in ("config_file", "output_config") or value is None or value == defaults.get(key):
            continue
        values[key] = value
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    print(f"wrote config: {path}", file=sys.stdout)
