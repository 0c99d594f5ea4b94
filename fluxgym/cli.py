"""`python -m fluxgym`: prepare, generate, train, resume, stop, status, models, demo, queue, worker.

Parsing only; the work is in prepare/generate/runner/status/models/demo (queue/worker: fluxgym/jobs/cli.py,
which lists two more codes). Exit codes: 0 ok, 1 the run failed, 2 bad input or usage (message names the
option or file), 3 nothing to act on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from fluxgym import __version__
from fluxgym.generate import REPO_ROOT, GenerateOptions, generate
from fluxgym.jobs.cli import add_job_parsers, run_queue, run_worker
from fluxgym.models import ModelError
from fluxgym.naming import LoraNameError, check_claim, claim_slug, project_paths, resolve_existing
from fluxgym.prepare import DatasetError, apply_plan, plan_dataset
from fluxgym.presets import PresetError, preset_names
from fluxgym.supervise.options import add_deadline_flags, deadlines_from

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3
INPUT_ERRORS = (DatasetError, ModelError, LoraNameError, PresetError, ValueError)


def _default_root() -> Path:
    return Path(os.environ.get("FLUXGYM_ROOT") or REPO_ROOT)


def _add_common(p: argparse.ArgumentParser, name: bool = True) -> None:
    if name:
        p.add_argument("name", metavar="NAME", help="LoRA name (made into a safe folder name)")
    p.add_argument("--root", type=Path, default=None,
                   help="project root holding models/, datasets/, outputs/ (default: $FLUXGYM_ROOT or this checkout)")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="write outputs/<name>/train.sh, train.bat, dataset.toml, sample_prompts.txt")
    _add_common(g)
    _add_generate_options(g)


def _add_generate_options(g: argparse.ArgumentParser) -> None:
    """The options of `generate`, shared with `queue add`."""
    g.add_argument("--vram", required=True, choices=preset_names(), help="VRAM preset (see README)")
    g.add_argument("--trigger", help="trigger word/sentence (class_tokens); default: NAME")
    g.add_argument("--base-model", default="flux-dev", help="models.yaml key or a DiT file path (default flux-dev)")
    g.add_argument("--epochs", type=int, default=16)
    g.add_argument("--save-every", type=int, default=4, help="save a LoRA (and state) every N epochs")
    g.add_argument("--repeats", type=int, default=10, help="repeats per image per epoch")
    g.add_argument("--resolution", type=int, default=None, help="training resolution (default: the preset's)")
    g.add_argument("--lr", default="8e-4", help="learning rate (default 8e-4)")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank / --network_dim (default 4)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--workers", type=int, default=None, help="data loader workers (default: the preset's)")
    g.add_argument("--sample-prompts", type=Path, help="file with one sample prompt per line")
    g.add_argument("--sample-every", type=int, default=0, help="sample every N steps (0: off)")
    g.add_argument("--resume", metavar="auto|PATH", help="resume from a state folder (auto: the newest valid one)")
    g.add_argument("--no-checkpointing", action="store_true", help="no state folders (a killed run cannot resume)")
    g.add_argument("--trainer-script", type=Path,
                   help="trainer entry script (default: sd-scripts/flux_train_network.py)")
    g.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate",
                   help="run through `accelerate launch` (default) or plain python")
    g.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="everything after --extra is passed to the trainer verbatim (must come last)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fluxgym", description="FLUX LoRA training, FluxGym-style.")
    parser.add_argument("--version", action="version", version=f"fluxgym {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="copy and resize images into datasets/<name>/ with captions")
    _add_common(p)
    p.add_argument("--images", type=Path, required=True, help="folder of images (optional <image>.txt captions)")
    p.add_argument("--trigger", default="", help="caption for images that have none")
    p.add_argument("--resolution", type=int, default=512, help="shorter side after resizing (default 512)")
    p.add_argument("--replace", action="store_true",
                   help="make datasets/<name>/ match --images: remove the images and captions the folder no "
                        "longer has and overwrite captions it changed, listing them (without it, prepare stops "
                        "and lists them)")
    _add_generate(sub)
    for cmd, text in (("train", "run outputs/<name>/train.sh under supervision"),
                      ("resume", "continue from the newest valid checkpoint (or start fresh)")):
        t = sub.add_parser(cmd, help=text)
        _add_common(t)
        t.add_argument("--grace", type=float, default=10.0, help="seconds between TERM and KILL when ending the run")
        t.add_argument("--quiet", action="store_true", help="do not echo the trainer output (the log file has it)")
        t.add_argument("--no-auto-resume", action="store_true",
                       help="after a stall, crash or out-of-memory death, stop instead of resuming from the "
                       "newest valid state")
        add_deadline_flags(t)
    s = sub.add_parser("stop", help="end a running training and its whole process tree")
    _add_common(s)
    s.add_argument("--grace", type=float, default=10.0, help="seconds between TERM and KILL")
    st = sub.add_parser("status", help="state, phase, step, loss, last checkpoint, restarts, recent events")
    _add_common(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--lines", type=int, default=10, help="recent events shown (default 10)")
    m = sub.add_parser("models", help="list models.yaml entries or download one")
    m.add_argument("action", choices=("list", "download"))
    m.add_argument("key", nargs="?")
    _add_common(m, name=False)
    d = sub.add_parser("demo", help="build the embedded demo: tiny models, dataset, outputs/demo/train.sh")
    _add_common(d, name=False)
    d.add_argument("--force", action="store_true", help="rebuild the tiny models even if present")
    d.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="trainer flags written into outputs/demo/train.sh (must come last; run `demo` again "
                        "without it to get the plain demo back)")
    add_job_parsers(sub, _add_common, _add_generate_options)
    # `ui` has its own parser (fluxgym.webui.server); listed here so --help shows it.
    sub.add_parser("ui", help="web UI + JSON API (python -m fluxgym ui --help)", add_help=False)
    return parser


def _cmd_prepare(a, root: Path) -> int:
    paths = project_paths(root, a.name)
    check_claim(paths, a.name)  # before writing: another LoRA's dataset must not be merged into
    plan = plan_dataset(a.images, paths.dataset_dir, trigger=a.trigger, resolution=a.resolution,
                        replace=a.replace)
    for note in plan.notes:
        print(f"note: {note}")
    done = apply_plan(plan)
    claim_slug(paths, a.name)
    kept = sum(p.caption_kept for p in done)
    removed = f", {len(plan.remove)} files removed" if plan.remove else ""
    print(f"prepared {len(done)} images in {paths.dataset_dir} ({kept} existing captions kept{removed})")
    return EXIT_OK


def _generate_options(a, root: Path) -> GenerateOptions:
    return GenerateOptions(
        name=a.name, vram=a.vram, root=root, trigger=a.trigger, base_model=a.base_model, epochs=a.epochs,
        save_every=a.save_every, repeats=a.repeats, resolution=a.resolution, lr=a.lr, rank=a.rank, seed=a.seed,
        workers=a.workers, sample_prompts=a.sample_prompts, sample_every=a.sample_every, resume=a.resume,
        checkpointing=not a.no_checkpointing, extra=list(a.extra), trainer_script=a.trainer_script,
        launcher=a.launcher)


def _cmd_generate(a, root: Path) -> int:
    res = generate(_generate_options(a, root))
    for f in res.files.values():
        print(f"wrote {f}")
    print(f"expected training steps: {res.expected_steps} (images x repeats x epochs, batch size 1)")
    if res.missing_models:
        print("note: model files missing (fetch them before `train`):\n" +
              "\n".join(f"  - {p}" for p in res.missing_models))
    return EXIT_OK


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # the supervisor answers it by ending the whole training tree


def _run(a, root: Path, extra: list[str]) -> int:
    from fluxgym.runner import run_training
    from fluxgym.supervise import RestartPolicy

    deadlines = deadlines_from(a)  # ValueError naming the flag: exit 2 before anything starts
    paths = resolve_existing(root, a.name)
    policy = RestartPolicy(auto_resume=not a.no_auto_resume, max_restarts=a.max_restarts)
    # The trainer runs in its own session, so only we get the terminal's signals. A TERM meant for us ends the
    # whole tree like Ctrl-C. A closed terminal (HUP: an ssh session dropped) ends only the console echo: the
    # trainer writes train.log itself, so the run and its supervision go on (`fluxgym status` shows them).
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if hasattr(signal, "SIGHUP"):
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        res = run_training(paths, extra, echo=None if a.quiet else sys.stdout, grace=a.grace,
                           deadlines=deadlines, policy=policy)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    with contextlib.suppress(OSError):  # the terminal may be gone; last_run.json has the verdict
        print(res.summary, file=sys.stdout if res.success else sys.stderr)
    return EXIT_OK if res.success else EXIT_FAILED


def _cmd_resume(a, root: Path) -> int:
    from fluxgym.status import newest_valid_state

    paths = resolve_existing(root, a.name)
    try:
        info = newest_valid_state(paths)
    except ImportError as exc:
        print(f"error: checkpoint validation is unavailable ({exc}); cannot pick a checkpoint", file=sys.stderr)
        return EXIT_FAILED
    if info is None:
        print(f"no valid checkpoint in {paths.output_dir}; starting fresh")
        return _run(a, root, [])
    print(f"resuming from {info.path} (step {info.step})")
    return _run(a, root, ["--resume", str(info.path)])


def _cmd_stop(a, root: Path) -> int:
    from fluxgym.runner import stop_run

    paths = resolve_existing(root, a.name)
    running, left = stop_run(paths, grace=a.grace)
    if left:
        print(f"could not end processes {left} of '{paths.slug}'", file=sys.stderr)
        return EXIT_FAILED
    if running:
        print(f"stopped '{paths.slug}'")
        return EXIT_OK
    from fluxgym.status import trainer_holding

    holder = trainer_holding(paths)
    if holder is not None:  # status says it runs: say why stop leaves it alone and what does stop it
        print(f"'{paths.slug}' is not running under fluxgym, but a trainer started another way (bash train.sh?) "
              f"holds {paths.output_dir}: pid {holder.get('pid')}. Stop it with Ctrl-C in its terminal or "
              f"`kill {holder.get('pid')}` (completed checkpoints stay valid).", file=sys.stderr)
    else:
        print(f"'{paths.slug}' is not running")
    return EXIT_NOTHING


def _cmd_status(a, root: Path) -> int:
    from fluxgym.status import format_status, run_status

    st = run_status(resolve_existing(root, a.name), lines=a.lines)
    print(json.dumps(st, indent=2) if a.json else format_status(st))
    return EXIT_OK


def _cmd_models(a, root: Path) -> int:
    from fluxgym import models

    if a.action == "list":
        for key, entry in models.load_models_yaml().items():
            files = models.resolve_base_model(root, key)
            state = "present" if not models.missing_files(files) else "missing"
            print(f"{key:32s} {state:8s} {entry.get('base', '')}")
        return EXIT_OK
    if not a.key:
        print("error: models download needs a KEY", file=sys.stderr)
        return EXIT_USAGE
    for path in models.download(root, a.key):
        print(f"ok: {path}")
    return EXIT_OK


def _cmd_demo(a, root: Path) -> int:
    from fluxgym.demo import build_demo

    script = build_demo(root, force=a.force, extra=tuple(a.extra))
    print(f"demo ready: bash {script}")
    return EXIT_OK


COMMANDS = {"prepare": _cmd_prepare, "generate": _cmd_generate, "train": lambda a, r: _run(a, r, []),
            "resume": _cmd_resume, "stop": _cmd_stop, "status": _cmd_status, "models": _cmd_models,
            "demo": _cmd_demo, "queue": lambda a, r: run_queue(a, r, _generate_options), "worker": run_worker}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ui"]:
        from fluxgym.webui.server import main as ui_main  # lazy: gradio is heavy and only the UI needs it

        return ui_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    root = (args.root or _default_root()).resolve()
    try:
        return COMMANDS[args.command](args, root)
    except INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # RunError and friends: could not start
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
