"""The supervisor's command-line flags, shared by `python -m fluxgym train|resume` and training_monitor.py,
so both accept the same deadline flags with the same defaults."""

from __future__ import annotations

import argparse

from fluxgym.supervise.progress import Deadlines


def add_deadline_flags(p: argparse.ArgumentParser, *, restart_cap: bool = True) -> None:
    d = Deadlines()
    if restart_cap:
        p.add_argument("--max-restarts", type=int, default=3,
                       help="restart cap for stalls and crashes (default 3; out-of-memory retries follow the "
                       "block-swap ladder instead)")
    p.add_argument("--stuck-threshold", type=float, default=d.stuck_threshold, metavar="SECONDS",
                   help=f"minimum seconds a training step may take (default {d.stuck_threshold:g}); the deadline "
                   "is max(this, 5 x p99 of observed step times)")
    p.add_argument("--first-step-timeout", type=float, default=d.first_step, metavar="SECONDS",
                   help=f"step deadline until the first step of each launch is done (default {d.first_step:g})")
    p.add_argument("--loading-timeout", type=float, default=d.loading, metavar="SECONDS",
                   help=f"model loading (default {d.loading:g})")
    p.add_argument("--caching-timeout", type=float, default=d.caching, metavar="SECONDS",
                   help=f"latent/text caching (default {d.caching:g})")
    p.add_argument("--save-timeout", type=float, default=d.saving, metavar="SECONDS",
                   help=f"checkpoint saving (default {d.saving:g})")
    p.add_argument("--sample-timeout", type=float, default=d.sampling, metavar="SECONDS",
                   help=f"sample generation (default {d.sampling:g})")


_FLAGS = {"loading_timeout": "--loading-timeout", "caching_timeout": "--caching-timeout",
          "save_timeout": "--save-timeout", "sample_timeout": "--sample-timeout",
          "stuck_threshold": "--stuck-threshold", "first_step_timeout": "--first-step-timeout"}


def deadlines_from(args: argparse.Namespace) -> Deadlines:
    """The Deadlines the flags ask for; ValueError naming the flag when one is not a positive number."""
    for attr, flag in _FLAGS.items():
        value = getattr(args, attr)
        if not value > 0:  # also refuses nan
            raise ValueError(f"{flag} {value:g}: must be more than 0 seconds")
    if getattr(args, "max_restarts", 0) < 0:
        raise ValueError(f"--max-restarts {args.max_restarts}: must be 0 or more")
    return Deadlines(loading=args.loading_timeout, caching=args.caching_timeout, saving=args.save_timeout,
                     sampling=args.sample_timeout, stuck_threshold=args.stuck_threshold,
                     first_step=args.first_step_timeout)
