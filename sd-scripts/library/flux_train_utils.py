"""Upstream-compatible home of `add_flux_train_arguments(parser)` (FluxGym imports it)."""
from __future__ import annotations

import argparse

from library import args as flags


def add_flux_train_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flux_arguments(parser)
