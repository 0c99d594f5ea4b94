"""Apply, check, list or reverse the fluxtrain hang hardening on an upstream sd-scripts checkout.

    python patches/apply.py [--check | --reverse | --list | --dry-run] [--json] SD_SCRIPTS_DIR

Exit codes: 0 ok (applied / already applied / check passed), 1 check found missing patches or a reverse
could not restore a file, 2 usage error, 3 drift (a target exists but its expected shape is gone; nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `patches` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patches import engine  # noqa: E402

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_DRIFT = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apply.py",
        description="Harden an sd-scripts checkout against hangs (DataLoader, block swap, cache I/O, resume).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 0 if every applicable patch is present, else 1")
    mode.add_argument("--reverse", action="store_true", help="restore every touched file to its original bytes")
    mode.add_argument("--list", action="store_true", help="show each patch, why it exists and its status")
    mode.add_argument("--dry-run", action="store_true", help="show what apply would change; write nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("sd_scripts_dir", help="the sd-scripts checkout (the folder with train_network.py)")
    return parser


def _report_dict(p: engine.Plan) -> dict:
    return {
        "root": str(p.root),
        "upstream_commit": engine.upstream_commit(p.root),
        "helper": p.helper,
        "patches": [asdict(r) for r in p.reports],
        "would_change": _would_change(p),
        "drift": p.drift,
    }


def _print_patches(p: engine.Plan, verbose: bool) -> None:
    for r in p.reports:
        print(f"{r.id} {r.title}: {r.status}")
        if verbose:
            print(f"    {r.description}")
            print(f"    why: {r.why}")
        for f in r.files:
            if f.sites:
                detail = f"{f.sites} site(s), {f.patched} patched, {f.pending} missing"
                print(f"    {f.file}: {detail} [{', '.join(f.symbols)}]")
        if r.status == "not applicable" and verbose:
            print(f"    no target in this checkout ({', '.join(r.absent[:4]) or 'no matching call'} absent)")
        for d in r.drift:
            print(f"    DRIFT {d}")
    print(f"helper {engine.HELPER_REL}: {p.helper}")


def _emit(args, payload: dict, lines) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        lines()


def _drift_exit(args, p: engine.Plan, payload: dict) -> int:
    payload["exit_code"] = EXIT_DRIFT

    def lines():
        _print_patches(p, verbose=False)
        print("drift: upstream changed where a patch applies; nothing was written. Details:", file=sys.stderr)
        for d in p.drift:
            print(f"  {d}", file=sys.stderr)

    _emit(args, payload, lines)
    return EXIT_DRIFT


def _run_reverse(args, root: Path) -> int:
    restored, problems = engine.reverse(root)
    code = EXIT_MISSING if problems else EXIT_OK
    payload = {"mode": "reverse", "root": str(root), "restored": restored, "problems": problems, "exit_code": code}

    def lines():
        for rel in restored:
            print(f"restored {rel}")
        for msg in problems:
            print(f"not restored: {msg}", file=sys.stderr)
        if not restored and not problems:
            print("nothing to reverse: no file was changed by this tool")

    _emit(args, payload, lines)
    return code


def _run_apply(args, p: engine.Plan, payload: dict) -> int:
    changed = engine.apply_plan(p)
    after = engine.plan(p.root, engine.load_series())
    payload.update(mode="apply", changed=changed, exit_code=EXIT_OK if after.complete else EXIT_MISSING)
    payload["patches"] = [asdict(r) for r in after.reports]

    def lines():
        _print_patches(after, verbose=False)
        print(f"changed {len(changed)} file(s)" + (": " + ", ".join(changed) if changed else " (already applied)"))

    _emit(args, payload, lines)
    return payload["exit_code"]


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the problem; return its code instead of exiting
        return int(exc.code or 0)
    try:
        root = engine.check_checkout(args.sd_scripts_dir)
    except engine.UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"apply.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.reverse:
        return _run_reverse(args, root)
    p = engine.plan(root, engine.load_series())
    payload = _report_dict(p)
    if p.drift:
        return _drift_exit(args, p, payload)
    if args.check or args.list or args.dry_run:
        mode = "check" if args.check else "list" if args.list else "dry-run"
        code = EXIT_MISSING if args.check and not p.complete else EXIT_OK
        payload.update(mode=mode, exit_code=code)
        _emit(args, payload, lambda: (_print_patches(p, verbose=args.list), _print_dry(p) if args.dry_run else None))
        return code
    return _run_apply(args, p, payload)


def _would_change(p: engine.Plan) -> list:
    helper = {engine.HELPER_REL} if p.helper in ("missing", "outdated") else set()
    return sorted(set(p.new_texts) | helper)


def _print_dry(p: engine.Plan) -> None:
    would = _would_change(p)
    print("would change: " + (", ".join(would) if would else "nothing (already applied)"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
