"""Find, list, validate and prune training checkpoints in an output folder (stdlib only, never imports torch).

- Default: the newest valid state folder and the command that resumes from it.
- `--list` / `--json`: every candidate with step, epoch, run, size, time and why it is invalid, and the earlier
  runs kept under runs/<id>/ (a fresh start moves the previous run's files there).
- `--validate PATH`: check one state folder or LoRA file.
- `--prune-keep N`: delete all but the newest N valid state folders (`--dry-run`, `--prune-invalid`).
- `--best`: valid checkpoints (of --type) ranked by the validation loss they recorded (--validation_split).
Exit codes: 0 found, 3 nothing valid found (with --best: none recorded a validation loss), 2 usage error, 1 other failure. Uses the trainer's validation module.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # entry script: the repository root, once; fluxgym._paths does the rest
    sys.path.insert(0, _REPO)

from fluxgym._paths import use_sd_scripts  # noqa: E402

use_sd_scripts()
from library import atomic_io  # noqa: E402
from library.checkpoint_validation import (  # noqa: E402
    CheckpointInfo,
    discover,
    newest_valid_state,
    read_manifest,
    read_safetensors_header,
    validate_lora_file,
    validate_state_dir,
)
from library.run_identity import archived_runs  # noqa: E402

from fluxgym.closed_pipe import quiet_closed_pipe  # noqa: E402

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NONE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="find_checkpoint.py",
        description="Find the newest complete checkpoint in a training output folder and how to resume from it.",
    )
    p.add_argument("output_dir", nargs="?", help="the trainer's --output_dir")
    p.add_argument("--type", choices=("state", "model", "all"), default="state",
                   help="state folders (resume), LoRA files (model), or both (default: state)")
    p.add_argument("--name", help="only checkpoints of this --output_name")
    p.add_argument("--list", action="store_true", help="list every candidate with its validity")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--validate", metavar="PATH", help="validate one state folder or LoRA file")
    p.add_argument("--best", action="store_true",
                   help="rank valid checkpoints by their recorded validation loss and name the best one")
    p.add_argument("--prune-keep", type=int, metavar="N", help="delete all but the newest N valid state folders")
    p.add_argument("--dry-run", action="store_true", help="with --prune-keep: only say what would be deleted")
    p.add_argument("--prune-invalid", action="store_true",
                   help="with --prune-keep: also delete invalid folders and leftovers of interrupted saves")
    return p


def _fmt_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fluxgym_resume(output_dir: Path) -> str | None:
    """`python -m fluxgym resume SLUG` when `generate` made this folder (run.json, outputs/<slug>/), else None."""
    try:
        info = json.loads((output_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    slug = info.get("slug") if isinstance(info, dict) else None
    folder = output_dir.resolve()
    if not isinstance(slug, str) or folder.name != slug or folder.parent.name != "outputs":
        return None  # moved or renamed since `generate`: fluxgym would look elsewhere
    cmd = f"python -m fluxgym resume {shlex.quote(slug)}"
    root = folder.parent.parent
    if root != _REPO or os.environ.get("FLUXGYM_ROOT"):  # fluxgym's default root is this checkout
        cmd += f" --root {shlex.quote(str(root))}"
    return cmd


def resume_commands(output_dir: Path, info: CheckpointInfo) -> list[str]:
    """Commands that resume this folder's run from `info`: its train.sh, and fluxgym's own where it fits."""
    cmds = []
    train_sh = output_dir / "train.sh"
    if train_sh.is_file():
        cmds.append(f"bash {shlex.quote(str(train_sh))} --resume {shlex.quote(str(info.path))}")
    fluxgym = _fluxgym_resume(output_dir)
    if fluxgym is not None:
        cmds.append(fluxgym)
    return cmds


def resume_hint(info: CheckpointInfo) -> str:
    """For a folder with neither: the flag to add to whatever command trained it."""
    return f"add `--resume {shlex.quote(str(info.path))}` to your training command (the one that wrote this folder)"


def _row(info: CheckpointInfo) -> str:
    status = "valid" if info.valid else f"INVALID: {info.reason}"
    step = "-" if info.step is None else str(info.step)
    epoch = "-" if info.epoch is None else str(info.epoch)
    run = "-" if info.run_id is None else str(info.run_id)
    return f"{info.path.name:<44} step {step:>8}  epoch {epoch:>4}  run {run:>3}  {_fmt_size(info.size):>10}  " \
           f"{_fmt_time(info.mtime)}  {status}"


def _kinds(t: str) -> list[str]:
    return ["state", "model"] if t == "all" else [t]


def _run_validate(args) -> int:
    path = Path(args.validate)
    if not path.exists():
        print(f"--validate: {path} does not exist", file=sys.stderr)
        return EXIT_USAGE
    info = validate_state_dir(path) if path.is_dir() else validate_lora_file(path)
    if args.json:
        print(json.dumps(info.to_json(), indent=2, sort_keys=True))
    else:
        print(_row(info))
    return EXIT_OK if info.valid else EXIT_NONE


def _run_find(args, output_dir: Path) -> int:
    result: dict = {"output_dir": str(output_dir), "type": args.type, "newest": {}, "candidates": {}}
    found_any = False
    for kind in _kinds(args.type):
        cands = discover(output_dir, kind=kind, output_name=args.name)
        newest = next((c for c in cands if c.valid), None)
        if kind == "state" and newest is not None:  # the trainer's --resume auto rule: the folder's current run
            picked = newest_valid_state(output_dir, args.name, log=False)
            newest = next((c for c in cands if picked is not None and c.path == picked.path), None)
        found_any |= newest is not None
        entry = None
        if newest is not None:
            entry = newest.to_json()
            if kind == "state":
                entry["resume_commands"] = resume_commands(output_dir, newest)
                entry["resume_args"] = ["--resume", str(newest.path)]
        result["newest"][kind] = entry
        result["candidates"][kind] = [c.to_json() for c in cands]
        if not args.json:
            _print_kind(kind, cands, newest, output_dir, args.list)
    result["runs"] = archived_runs(output_dir)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.list:
        _print_runs(result["runs"])
    return EXIT_OK if found_any else EXIT_NONE


def _print_runs(runs: list[dict]) -> None:
    if not runs:
        return
    print("earlier runs kept apart (runs/<id>/, never resumed by --resume auto):")
    for run in runs:
        print(f"  run {run['run_id']}: {len(run['states'])} state folder(s), {len(run['lora_files'])} LoRA file(s) "
              f"in {run['path']}")


def _print_kind(kind, cands, newest, output_dir: Path, list_all: bool) -> None:
    what = "state folder" if kind == "state" else "LoRA file"
    if list_all:
        print(f"{what}s in {output_dir} (newest first):")
        for c in cands:
            print("  " + _row(c))
        if not cands:
            print("  (none)")
    if newest is None:
        print(f"no valid {what} found in {output_dir}")
        return
    for c in cands:
        if c is newest:
            break
        if not list_all:
            print(f"skipped {c.path.name}: {c.reason}")
    print(f"newest valid {what}: {newest.path} (step {newest.step}, epoch {newest.epoch})")
    if kind == "state":
        cmds = resume_commands(output_dir, newest)
        print("resume with:" if cmds else "to resume:")
        for line in cmds or [resume_hint(newest)]:
            print(f"  {line}")


def _in_use(path: Path) -> bool:
    parsed = atomic_io.parse_leftover(path.name)
    return bool(parsed and parsed[2] is not None and atomic_io.pid_alive(parsed[2]))


def _run_prune(args, output_dir: Path) -> int:
    cands = discover(output_dir, kind="state", output_name=args.name)
    valid = [c for c in cands if c.valid]
    doomed = valid[args.prune_keep :]
    invalid = [c for c in cands if not c.valid]
    verb = "would delete" if args.dry_run else "deleting"
    report = {"kept": [str(c.path) for c in valid[: args.prune_keep]], "deleted": [], "invalid": [],
              "dry_run": args.dry_run}
    for c in doomed + (invalid if args.prune_invalid else []):
        if c.label == "leftover" and _in_use(c.path):
            if not args.json:
                print(f"kept {c.path}: its process is still running")
            continue
        if not args.json:
            print(f"{verb} {c.path}" + ("" if c.valid else f" (invalid: {c.reason})"))
        if not args.dry_run:
            # temps and trash are already invisible to discovery: delete in place; finals go via trash
            atomic_io.delete_tree(c.path) if c.label == "leftover" else atomic_io.remove_tree(c.path)
        report["deleted"].append(str(c.path))
    if not args.prune_invalid:
        for c in invalid:
            if not args.json:
                print(f"invalid, kept (use --prune-invalid to delete): {c.path}: {c.reason}")
            report["invalid"].append({"path": str(c.path), "reason": c.reason})
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    return EXIT_OK if valid else EXIT_NONE


def validation_record(info: CheckpointInfo) -> tuple[float, int] | None:
    """(validation loss, step it was measured at) that a checkpoint recorded, or None."""
    try:
        if info.path.is_dir():
            record = read_manifest(info.path).get("validation") or {}
            return float(record["validation_loss"]), int(record["validation_step"])
        meta = read_safetensors_header(info.path)[0].get("__metadata__") or {}
        return float(meta["fluxtrain_validation_loss"]), int(meta["fluxtrain_validation_step"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _run_best(args, output_dir: Path) -> int:
    ranked = []
    for kind in _kinds(args.type):
        for c in discover(output_dir, kind=kind, output_name=args.name, leftovers=False):
            record = validation_record(c) if c.valid else None
            if record is not None:
                ranked.append((record[0], record[1], c))
    ranked.sort(key=lambda r: (r[0], -r[1]))  # equal losses: the later step first
    rows = [{**c.to_json(), "validation_loss": loss, "validation_step": step} for loss, step, c in ranked]
    if args.json:
        print(json.dumps({"output_dir": str(output_dir), "best": rows[0] if rows else None, "ranked": rows},
                         indent=2, sort_keys=True))
    elif not rows:
        print(f"no valid checkpoint in {output_dir} recorded a validation loss (train with --validation_split)")
    else:
        print(f"checkpoints in {output_dir} by validation loss (lowest first):")
        for loss, step, c in ranked:
            print(f"  {loss:12.6f}  at step {step:>8}  {c.path.name}")
        print(f"best: {ranked[0][2].path} (validation loss {ranked[0][0]:.6f} at step {ranked[0][1]})")
    return EXIT_OK if rows else EXIT_NONE


def main(argv: list[str] | None = None) -> int:
    with quiet_closed_pipe():  # `find_checkpoint.py DIR --list | head -1`: no traceback, the usual exit code
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.validate:
        return _run_validate(args)
    if not args.output_dir:
        parser.print_usage(sys.stderr)
        print("find_checkpoint.py: error: OUTPUT_DIR is required (or use --validate PATH)", file=sys.stderr)
        return EXIT_USAGE
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        print(f"find_checkpoint.py: error: {output_dir} is not a folder (pass the trainer's --output_dir)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.prune_keep is not None:
        if args.prune_keep < 1:
            print("find_checkpoint.py: error: --prune-keep must be at least 1 (the newest valid state is never "
                  "deleted)", file=sys.stderr)
            return EXIT_USAGE
        return _run_prune(args, output_dir)
    if args.best:
        return _run_best(args, output_dir)
    if args.dry_run or args.prune_invalid:
        print("find_checkpoint.py: error: --dry-run/--prune-invalid need --prune-keep N", file=sys.stderr)
        return EXIT_USAGE
    return _run_find(args, output_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
