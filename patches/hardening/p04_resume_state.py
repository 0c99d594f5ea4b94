"""P04: accelerate state saves record the global step; state loads survive the `KeyError: 'step'`.

Rewrites `accelerator.save_state(...)` to `save_state_at_step(accelerator, <step or None>, ...)` and
`accelerator.load_state(...)` to `load_state_with_fallback(accelerator, ...)` wherever they appear in the
monolith (`library/train_util.py`) or the split layout (`library/checkpoint_io.py`, `library/args.py`), and in any
other `library/` module that defines one of the save/resume functions (they keep moving while upstream splits files).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from patches.astedit import (
    HELPER_ALIAS,
    Drift,
    Site,
    Source,
    dotted_name,
    function_params,
    parses,
    replace_callee,
)

ID = "P04"
TITLE = "resume-state"
DESCRIPTION = "accelerator.save_state stores the global step; accelerator.load_state falls back on KeyError 'step'"
WHY = (
    "accelerate 0.32/0.33 (pinned by sd3 from 2024-09 to 2025-08) reads 'step' from random_states_0.pkl without "
    "a guard, so resuming a state whose RNG pickle lacks it, or cannot be loaded under torch>=2.6 weights_only, "
    "dies with KeyError: 'step' after everything else was loaded. The fallback restores RNG and step itself. "
    "Saving the global step into accelerate's counter makes that value meaningful. Origin: fluxtrain; Forwarded: no."
)
FIX = "resume-safe accelerate state save/load (KeyError 'step' fallback, step recorded)"
FILES = ("library/train_util.py", "library/checkpoint_io.py", "library/args.py")
SAVE_FUNCS = ("save_and_remove_state_on_epoch_end", "save_and_remove_state_stepwise", "save_state_on_train_end")
LOAD_FUNCS = ("resume_from_local_or_hf_if_specified",)
STEP_PARAMS = ("step_no", "global_step", "step", "current_step")
HELPERS = {"save_state": f"{HELPER_ALIAS}.save_state_at_step", "load_state": f"{HELPER_ALIAS}.load_state_with_fallback"}


_TARGET_NAMES = "|".join(SAVE_FUNCS + LOAD_FUNCS)
_DEFINES_TARGET = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(?:%s)[ \t]*\(" % _TARGET_NAMES, re.M)
_OWN_HELPER = "fluxtrain_hardening.py"


def candidate_files(root: Path) -> list:
    """The known homes, then every other `library/` module (sub-packages too) defining a save/resume function."""
    names = list(FILES)
    library = root / "library"
    for path in sorted(library.rglob("*.py")) if library.is_dir() else []:
        rel = path.relative_to(root).as_posix()
        if rel in names or path.name == _OWN_HELPER or "__pycache__" in path.parts:
            continue
        if _DEFINES_TARGET.search(path.read_text(encoding="utf-8", errors="replace")) and parses(path):
            names.append(rel)  # a stray copy that does not parse is not a target (the known homes must parse)
    return names


def _kind(call: ast.Call) -> str | None:
    func = call.func
    if not isinstance(func, ast.Attribute):
        return None
    receiver = func.value
    if isinstance(receiver, ast.Name) and receiver.id == HELPER_ALIAS:
        return "patched" if func.attr in ("save_state_at_step", "load_state_with_fallback") else None
    tail = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
    if func.attr in HELPERS and tail == "accelerator":
        return func.attr
    return None


def _step_argument(src: Source, call: ast.Call) -> str:
    func = src.enclosing_function(call)
    params = function_params(func) if func is not None else []
    return next((p for p in STEP_PARAMS if p in params), "None")


def _delegates(src: Source, func) -> bool:
    """True for a thin wrapper such as `return checkpoint_io.<same name>(...)` (no accelerator call of its own)."""
    if any(_kind(c) for c in src.calls(func)):
        return False
    for call in src.calls(func):
        name = dotted_name(call.func)
        if name and name.split(".")[-1] == func.name and name != func.name:
            return True
    return False


def find_sites(relpath: str, src: Source) -> list:
    sites = []
    for call in src.calls():
        kind = _kind(call)
        if kind is None:
            continue
        site = Site(call=call, stmt=src.enclosing_stmt(call), symbol=src.qualname(call))
        receiver = src.segment(call.func.value)
        if kind == "save_state":
            site.edits = replace_callee(src, call, HELPERS[kind], [receiver, _step_argument(src, call)])
        elif kind == "load_state":
            site.edits = replace_callee(src, call, HELPERS[kind], [receiver])
        sites.append(site)
    for name in SAVE_FUNCS + LOAD_FUNCS:
        for func in src.functions(name):
            if _delegates(src, func):
                continue  # a backward-compatible wrapper calling the moved function: patched where it now lives
            if not any(_kind(c) for c in src.calls(func)):
                what = "accelerator.save_state" if name in SAVE_FUNCS else "accelerator.load_state"
                raise Drift(relpath, src.qualname(func.body[0]), f"no {what}(...) call found in it")
    return sites


def check_total(found: dict) -> None:
    """Resume code lives in one of the candidate files in every layout; none at all means it moved."""
    if found and not any(found.values()):
        raise Drift(", ".join(sorted(found)), "accelerator.save_state/load_state", "not found in any candidate file")
