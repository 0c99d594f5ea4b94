"""P03: cached-latent and text-encoder `.npz` reads become bounded and fully materialised; writes atomic.

Rewrites `np.load(...)` to `bounded_npz_load(...)` and `np.savez(...)`/`np.savez_compressed(...)` to their
atomic versions in `library/strategy_base.py` and `library/strategy_flux.py`, arguments kept verbatim.
"""

from __future__ import annotations

import ast
from pathlib import Path

from patches.astedit import HELPER_ALIAS, Drift, Site, Source, dotted_name, replace_callee

ID = "P03"
TITLE = "cache-npz-io"
DESCRIPTION = "np.load of cache files becomes a bounded read that materialises every array; np.savez becomes atomic"
WHY = (
    "np.load on an .npz only reads the zip directory; the real reads happen at npz[key], in DataLoader workers, "
    "so a stalled network or cloud drive hangs a worker with no error. The bounded read covers the key reads too "
    "and names the file. np.savez writes the final path in place, so a kill mid-write leaves a torn zip that the "
    "next run re-raises on instead of re-caching; writing a temp file and renaming fixes that. "
    "Origin: fluxtrain; Forwarded: no."
)
FIX = "bounded cache read / atomic cache write (FLUXTRAIN_CACHE_IO_TIMEOUT)"
FILES = {
    "library/strategy_base.py": (
        "_default_is_disk_cached_latents_expected", "_default_load_latents_from_disk", "save_latents_to_disk",
    ),
    "library/strategy_flux.py": ("is_disk_cached_outputs_expected", "load_outputs_npz"),
}  # fmt: skip
WRITERS = ("save_latents_to_disk",)
REPLACEMENTS = {
    "load": f"{HELPER_ALIAS}.bounded_npz_load",
    "savez": f"{HELPER_ALIAS}.atomic_savez",
    "savez_compressed": f"{HELPER_ALIAS}.atomic_savez_compressed",
}
PATCHED = set(REPLACEMENTS.values())


def candidate_files(root: Path) -> list:
    return list(FILES)


def _numpy_aliases(src: Source) -> set:
    aliases = set()
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name == "numpy")
    return aliases


def _kind(call: ast.Call, aliases: set) -> str | None:
    name = dotted_name(call.func)
    if name in PATCHED:
        return "patched"
    if name and "." in name:
        module, attr = name.rsplit(".", 1)
        if module in aliases and attr in REPLACEMENTS:
            return attr
    return None


def find_sites(relpath: str, src: Source) -> list:
    aliases = _numpy_aliases(src)
    sites = []
    for call in src.calls():
        kind = _kind(call, aliases)
        if kind is None:
            continue
        site = Site(call=call, stmt=src.enclosing_stmt(call), symbol=src.qualname(call))
        if kind != "patched":
            site.edits = replace_callee(src, call, REPLACEMENTS[kind], [])
        sites.append(site)
    for name in FILES.get(relpath, ()):
        for func in src.functions(name):
            # the writer only reads to merge other resolutions into the file; a write alone is a valid shape too
            wanted = ("load", "patched") if name not in WRITERS else ("load", "patched", "savez", "savez_compressed")
            if not any(_kind(c, aliases) in wanted for c in src.calls(func)):
                raise Drift(relpath, src.qualname(func.body[0]), "no np.load(...) of the cache file found in it")
    if not any(_kind(s.call, aliases) in ("load", "patched") for s in sites):
        raise Drift(relpath, "np.load", "no np.load(...) call found in this caching module")
    return sites
