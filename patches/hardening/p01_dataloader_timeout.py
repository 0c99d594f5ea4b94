"""P01: every training/validation DataLoader in the training scripts gets a worker timeout and pin_memory.

Finds `torch.utils.data.DataLoader(...)` (or an imported `DataLoader(...)`) calls in the top-level scripts and
adds `timeout=` (only effective with worker processes) and `pin_memory=True` unless the call already has them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from patches.astedit import HELPER_ALIAS, Drift, Edit, Site, Source, dotted_name, parses

ID = "P01"
TITLE = "dataloader-timeout"
DESCRIPTION = "DataLoader constructions in the training scripts get timeout (workers > 0) and pin_memory=True"
WHY = (
    "A dead or stuck DataLoader worker (a stalled disk, a crashed worker on Windows) blocks the main process "
    "forever; with a timeout torch raises 'DataLoader timed out' instead, so a supervisor can resume. "
    "FluxGym's flux_train_network.py inherits its loaders from train_network.py, the file to patch. "
    "Origin: fluxtrain; Forwarded: no."
)
FIX = "worker timeout so a stuck DataLoader worker raises instead of hanging (FLUXTRAIN_DATALOADER_TIMEOUT)"

# Scripts that build loaders in every known revision; a missing loader there is drift, elsewhere it is skipped.
REQUIRED = ("train_network.py", "flux_train.py")
KNOWN = REQUIRED + (
    "sd3_train.py", "sdxl_train.py", "fine_tune.py", "train_db.py", "flux_train_control_net.py",
    "lumina_train.py", "anima_train.py", "train_control_net.py", "sdxl_train_control_net.py",
    "sdxl_train_control_net_lllite.py", "sdxl_train_control_net_lllite_old.py", "train_textual_inversion.py",
    "train_textual_inversion_XTI.py",
)  # fmt: skip
_NUM_WORKERS_POSITION = 5  # DataLoader(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, ...)


def candidate_files(root: Path) -> list:
    """Known training scripts plus any other top-level script that constructs a DataLoader.

    A discovered script that does not parse (a user's scratch file, another Python's syntax) is skipped
    rather than reported as drift; the known scripts still must parse.
    """
    names = list(KNOWN)
    for path in sorted(root.glob("*.py")):
        if path.name in names or "DataLoader(" not in path.read_text(encoding="utf-8", errors="replace"):
            continue
        if parses(path):
            names.append(path.name)
    return names


def _is_dataloader(call: ast.Call) -> bool:
    name = dotted_name(call.func)
    return name is not None and name.split(".")[-1] == "DataLoader"


def _missing_keywords_edit(src: Source, call: ast.Call, missing: list) -> list:
    """Insert `timeout=...`/`pin_memory=True` after the last argument, on a new line when the call is vertical."""
    args = [*call.args, *call.keywords]
    if not args:
        at = src.after_open_paren(call)
        return [Edit(at, at, ", ".join(missing))]
    last = max(args, key=lambda a: (a.end_lineno, a.end_col_offset))
    last_end = src.end(last)
    line_end = src.line_starts[last.end_lineno] if last.end_lineno < len(src.line_starts) else len(src.text)
    rest = src.text[last_end:line_end]
    stripped = rest.strip()
    vertical = last.lineno > call.lineno and (stripped in ("", ",") or stripped.lstrip(",").lstrip().startswith("#"))
    if not vertical:
        return [Edit(last_end, last_end, ", " + ", ".join(missing))]
    line = src.line_text(last.lineno)
    indent = line[: len(line) - len(line.lstrip(" \t"))]  # the argument line's indentation, never its code
    edits = [] if rest.lstrip().startswith(",") else [Edit(last_end, last_end, ",")]
    block = "".join(f"{indent}{kw},{src.newline}" for kw in missing)
    edits.append(Edit(line_end, line_end, block, rank=3))
    return edits


def _site_for(src: Source, call: ast.Call) -> Site:
    stmt = src.enclosing_stmt(call)
    site = Site(call=call, stmt=stmt, symbol=src.qualname(call))
    explicit = {kw.arg for kw in call.keywords if kw.arg}
    splats = [kw for kw in call.keywords if kw.arg is None]
    wanted = [name for name in ("timeout", "pin_memory") if name not in explicit]
    if not wanted:
        return site  # upstream already passes both
    if splats:
        value = splats[-1].value  # the keyword dict may hold them: merge at run time instead of guessing
        skip = ", ".join(repr(n) for n in sorted(explicit & {"timeout", "pin_memory"}))
        new = f"{HELPER_ALIAS}.harden_dataloader_kwargs({src.segment(value)}, skip=({skip}{',' if skip else ''}))"
        site.edits = [Edit(src.start(value), src.end(value), new)]
        return site
    workers = next((kw.value for kw in call.keywords if kw.arg == "num_workers"), None)
    if workers is None and len(call.args) > _NUM_WORKERS_POSITION:
        workers = call.args[_NUM_WORKERS_POSITION]
    workers_text = src.segment(workers) if workers is not None else "0"
    text = {"timeout": f"timeout={HELPER_ALIAS}.dataloader_timeout({workers_text})", "pin_memory": "pin_memory=True"}
    site.edits = _missing_keywords_edit(src, call, [text[name] for name in wanted])
    return site


def find_sites(relpath: str, src: Source) -> list:
    sites = [_site_for(src, call) for call in src.calls() if _is_dataloader(call)]
    if not sites and relpath in REQUIRED:
        raise Drift(relpath, "DataLoader", "no DataLoader(...) construction found in this training script")
    return sites
