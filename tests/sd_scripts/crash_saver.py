"""A stdlib-only stand-in for the trainer's save loop, for random `kill -9` trials.

Like a resumed trainer it first cleans leftovers, continues from the newest valid step, then saves state-like
folders through atomic_io forever: a step folder each time, `NAME-state` replaced every third save, and
rotation to the newest 3 step folders. Prints "ready" once it is about to start saving.
Usage: python -S crash_saver.py OUTPUT_DIR [--count N] [--payload FLOATS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve()
sys.path[:0] = [str(_HERE.parents[2] / "sd-scripts"), str(_HERE.parents[1] / "tools")]

import ckpt_zoo  # noqa: E402
from library import atomic_io, checkpoint_io  # noqa: E402
from library.checkpoint_validation import is_complete_staged, newest_valid_state  # noqa: E402

NAME = "crash"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--count", type=int, default=0, help="saves to make (0 = until killed)")
    p.add_argument("--payload", type=int, default=8192, help="floats per tensor (file sizes scale with it)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_io.cleanup_leftovers(out, is_complete=is_complete_staged)
    best = newest_valid_state(out, NAME, log=False)
    step = best.step if best else 0
    print("ready", flush=True)
    n = 0
    while args.count == 0 or n < args.count:
        step += 1
        n += 1
        ckpt_zoo.write_state(out, NAME, step=step, payload=args.payload)
        if step % 3 == 0:
            ckpt_zoo.write_state(out, NAME, step=step, folder=f"{NAME}-state", payload=args.payload)
        checkpoint_io.rotate(out, NAME, last_n_steps_state=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
