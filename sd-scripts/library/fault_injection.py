"""Fault injection for hang tests: make one guarded site stall on purpose.

`FLUXTRAIN_INJECT_HANG=<site>` makes `inject_point(site)` block forever. Each guarded
site calls it from inside its own bound, so a black-box test can prove the bound fires.
The site names are the injectable rows of `library.hang_sites`. Stdlib only: DataLoader
workers and the tools import it cheaply.
"""
from __future__ import annotations

import os
import sys
import time

from library.hang_sites import INJECTABLE

ENV_VAR = "FLUXTRAIN_INJECT_HANG"
_warned: set[str] = set()


def _matches(site: str) -> bool:
    """`site` stalls every process; `site@N` only the process whose RANK is N (multi-process tests)."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return False
    name, _, rank = wanted.partition("@")
    if name not in INJECTABLE and name not in _warned:
        # Only a warning: raising here could be taken for a damaged cache file by the caller's except.
        _warned.add(name)
        sys.stderr.write(f"{ENV_VAR}={wanted}: no such site; injectable: {', '.join(sorted(INJECTABLE))}\n")
    return name == site and (not rank or os.environ.get("RANK", "0") == rank)


def inject_point(site: str) -> None:
    """Stall forever when this site is the injected one; otherwise return at once.

    The loop sleeps in short slices so a signal handler (SIGALRM bounds) can raise
    inside it, like it would inside a real blocking read.
    """
    if not _matches(site):
        return
    while True:
        time.sleep(0.5)
