"""Fault injection for hang and recovery tests: make one guarded site stall or fail on purpose.

`FLUXTRAIN_INJECT_HANG=<site>` makes `inject_point(site)` block forever. Each guarded
site calls it from inside its own bound, so a black-box test can prove the bound fires.
`FLUXTRAIN_INJECT_OOM=step@N` makes the training step N raise torch.OutOfMemoryError, so the
supervisor's out-of-memory ladder is tested on CPU; `step@N<K` only while --blocks_to_swap < K
(the retry with more block swap then gets past step N).
Stdlib only: DataLoader workers and the tools import it cheaply (torch only when the OOM fires).
"""
from __future__ import annotations

import os
import re
import time

ENV_VAR = "FLUXTRAIN_INJECT_HANG"
OOM_ENV_VAR = "FLUXTRAIN_INJECT_OOM"
SITES = ("dataloader", "block_swap", "cache_io", "sample", "save", "step")
_OOM_SPEC = re.compile(r"^\s*(?P<site>\w+)@(?P<step>\d+)\s*(?:<\s*(?P<below>\d+))?\s*$")


def injected_site() -> str | None:
    site = os.environ.get(ENV_VAR, "").strip()
    return site or None


def _matches(site: str) -> bool:
    """`site` stalls every process; `site@N` only the process whose RANK is N (multi-process tests)."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return False
    name, _, rank = wanted.partition("@")
    return name == site and (not rank or os.environ.get("RANK", "0") == rank)


def _oom_due(site: str, step: int | None, blocks_to_swap: int | None) -> bool:
    m = _OOM_SPEC.match(os.environ.get(OOM_ENV_VAR, ""))
    if not m or m["site"] != site or step != int(m["step"]):
        return False
    return m["below"] is None or (blocks_to_swap or 0) < int(m["below"])


def _raise_oom(step: int | None, blocks_to_swap: int | None) -> None:
    import torch

    error = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    raise error(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {OOM_ENV_VAR} at step {step}, "
                f"blocks_to_swap={blocks_to_swap or 0})")


def inject_point(site: str, *, step: int | None = None, blocks_to_swap: int | None = None) -> None:
    """Stall forever when this site is the injected one, raise an injected out-of-memory error when
    one is due at this step; otherwise return at once.

    The loop sleeps in short slices so a signal handler (SIGALRM bounds) can raise
    inside it, like it would inside a real blocking read.
    """
    if step is not None and _oom_due(site, step, blocks_to_swap):
        _raise_oom(step, blocks_to_swap)
    if not _matches(site):
        return
    while True:
        time.sleep(0.5)
