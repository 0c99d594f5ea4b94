"""P02: the block-swap wait in `Offloader._wait_blocks_move` becomes bounded and hard-exits on timeout.

Finds the `<future>.result()` call inside every `_wait_blocks_move` in `library/custom_offloading_utils.py`
and routes it through `wait_swap_future(future, block_idx)`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from patches.astedit import HELPER_ALIAS, Drift, Site, Source, function_params, replace_callee

ID = "P02"
TITLE = "block-swap-wait"
DESCRIPTION = "Offloader._wait_blocks_move waits on the swap future with a timeout, then logs and hard-exits"
WHY = (
    "The swap worker can stall (CUDA OOM retries, PCIe-bound eGPUs, a stuck synchronise) and the main thread then "
    "waits on future.result() forever. The bounded wait catches concurrent.futures.TimeoutError (not the builtin "
    "TimeoutError on Python 3.10), names the block, dumps stacks and exits non-zero with os._exit, because the "
    "non-daemon worker would otherwise hang interpreter exit. Origin: fluxtrain; Forwarded: no."
)
FIX = "bounded wait on the block-swap future; a stuck swap exits the process (FLUXTRAIN_BLOCK_SWAP_TIMEOUT)"
FILE = "library/custom_offloading_utils.py"
SYMBOL = "_wait_blocks_move"
HELPER = f"{HELPER_ALIAS}.wait_swap_future"


def candidate_files(root: Path) -> list:
    return [FILE]


def _is_wait(call: ast.Call) -> bool:
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    return func.attr == "result" or (isinstance(func.value, ast.Name) and func.value.id == HELPER_ALIAS)


def find_sites(relpath: str, src: Source) -> list:
    functions = src.functions(SYMBOL)
    if not functions:
        raise Drift(relpath, SYMBOL, "the block-swap wait method is missing (renamed or moved upstream?)")
    sites = []
    for func in functions:
        calls = [c for c in src.calls(func) if _is_wait(c)]
        if not calls:
            raise Drift(relpath, src.qualname(func.body[0]), "no future.result() wait found in it")
        params = [p for p in function_params(func) if p not in ("self", "cls")]
        block_idx = params[0] if params else "None"
        for call in calls:
            site = Site(call=call, stmt=src.enclosing_stmt(call), symbol=src.qualname(call))
            if call.func.attr == "result":
                receiver = src.segment(call.func.value)
                site.edits = replace_callee(src, call, HELPER, [receiver, block_idx])
            sites.append(site)
    return sites
