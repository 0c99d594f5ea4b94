"""A stdlib-only stand-in for the trainer's save loop, for random `kill -9` trials.

Like a resumed trainer it first cleans leftovers, continues from the newest valid step, then saves state-like
folders through atomic_io forever: a step folder each time, `NAME-state` replaced every third save, and
rotation to the newest 3 step folders. Prints "ready PID" once it is about to start saving.
Usage: python -S crash_saver.py OUTPUT_DIR [--count N] [--payload FLOATS] [--serve]
With --serve it forks a fresh saver per "go" line, so hundreds of kill trials need no interpreter starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve()
sys.path[:0] = [str(_HERE.parents[2] / "sd-scripts"), str(_HERE.parents[1] / "tools")]

import ckpt_zoo  # noqa: E402
from library import atomic_io, checkpoint_io  # noqa: E402
from library.checkpoint_validation import is_complete_staged, newest_valid_state  # noqa: E402

NAME = "crash"


def save_forever(out: Path, count: int, payload: int) -> None:
    atomic_io.cleanup_leftovers(out, is_complete=is_complete_staged)
    best = newest_valid_state(out, NAME, log=False)
    step = best.step if best else 0
    print(f"ready {os.getpid()}", flush=True)
    n = 0
    while count == 0 or n < count:
        step += 1
        n += 1
        ckpt_zoo.write_state(out, NAME, step=step, payload=payload)
        if step % 3 == 0:
            ckpt_zoo.write_state(out, NAME, step=step, folder=f"{NAME}-state", payload=payload)
        checkpoint_io.rotate(out, NAME, last_n_steps_state=2)


def serve(out: Path, payload: int) -> None:
    """Fork a fresh saver per "go" line (no interpreter start per trial); "reap" waits for it to be dead."""
    child = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            sys.stdout.flush()
            child = os.fork()
            if child == 0:
                try:
                    save_forever(out, 0, payload)
                finally:
                    os._exit(0)
        elif cmd == "reap" and child is not None:
            _, status = os.waitpid(child, 0)
            print(f"reaped {status}", flush=True)
            child = None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--count", type=int, default=0, help="saves to make (0 = until killed)")
    p.add_argument("--payload", type=int, default=8192, help="floats per tensor (file sizes scale with it)")
    p.add_argument("--serve", action="store_true", help="fork one saver per 'go' line on stdin (POSIX)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.serve:
        serve(out, args.payload)
    else:
        save_forever(out, args.count, args.payload)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
