"""The hang-site table is the one definition: README guard table, flag defaults and inject points agree with it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from library.hang_sites import INJECTABLE, SITES

REPO = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)\s*`([\w.]+)`")


def _guard_table() -> list[list[str]]:
    """Rows (cells) of the README table whose header starts with `| guard (site) |`."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| guard (site) |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _defined_symbols(path: Path) -> set[str]:
    """Top-level functions/classes and `Class.method` names defined in a Python file."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_readme_guard_table_matches_the_site_table():
    rows = _guard_table()
    by_site = {}
    for cells in rows:
        m = re.search(r"\(`(\w+)`\)$", cells[0])
        if m:
            by_site[m.group(1)] = cells
    assert set(by_site) == set(SITES), "every hang site has exactly one README row, and no others"
    for name, site in SITES.items():
        guard, flag_cell, seen, code_cell = by_site[name]
        assert f"`{site.flag}` ({site.default_text()}" in flag_cell, (name, flag_cell)
        assert (f"HANG GUARD [{name}]" in seen) == site.ends_run, (name, seen)
        link = _LINK.fullmatch(code_cell)
        assert link, f"{name}: the code column must be [file](path) `symbol`, got {code_cell!r}"
        text, target, symbol = link.groups()
        assert (target, symbol) == (site.code, site.symbol), name
        assert text == Path(target).name


def test_every_code_link_in_the_guard_table_points_at_a_real_symbol():
    links = [_LINK.fullmatch(cells[-1]) for cells in _guard_table()]
    assert links and all(links), "every row of the guard table links to its code"
    for link in links:
        _, target, symbol = link.groups()
        path = REPO / target
        assert path.is_file(), target
        assert symbol in _defined_symbols(path), f"{target} defines no {symbol}"
    for site in SITES.values():  # the table itself, also for rows the README might drop one day
        assert site.symbol in _defined_symbols(REPO / site.code), (site.code, site.symbol)


def test_flag_defaults_are_the_tables():
    import flux_train_network

    parser = flux_train_network.setup_parser()
    defaults = {a.option_strings[0]: a.default for a in parser._actions if a.option_strings}
    for site in SITES.values():
        assert defaults[site.flag] == site.default, site.name


def test_inject_points_are_the_tables_injectable_sites():
    called = set()
    for path in (REPO / "sd-scripts").rglob("*.py"):
        called |= set(re.findall(r"\binject_point\(\s*\"(\w+)\"", path.read_text(encoding="utf-8")))
    assert called == INJECTABLE  # no inject point for an unknown site, none missing for a known one


def test_unknown_injected_site_is_reported_once(monkeypatch, capsys):
    from library import fault_injection

    monkeypatch.setenv(fault_injection.ENV_VAR, "cach_io")
    monkeypatch.setattr(fault_injection, "_warned", set())
    fault_injection.inject_point("cache_io")  # returns: nothing stalls
    fault_injection.inject_point("save")
    err = capsys.readouterr().err
    assert err.count("FLUXTRAIN_INJECT_HANG=cach_io: no such site") == 1
    assert "cache_io" in err


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
