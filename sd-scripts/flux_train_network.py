"""Train a FLUX.1 LoRA; command-line compatible with Kohya's sd-scripts `flux_train_network.py`.

    accelerate launch --mixed_precision bf16 sd-scripts/flux_train_network.py --pretrained_model_name_or_path ...

The parser and the trainer live in `library/`; this file only wires them together.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from library import args as flags  # noqa: E402
from library.flux_train_utils import add_flux_train_arguments  # noqa: E402
from train_network import setup_parser as setup_network_parser  # noqa: E402

log = logging.getLogger("flux_train_network")


def setup_parser() -> argparse.ArgumentParser:
    parser = setup_network_parser()
    add_flux_train_arguments(parser)
    flags.add_dit_arguments(parser)
    flags.add_hardening_arguments(parser)
    flags.add_unsupported_arguments(parser)
    return parser


def _setup_logging(ns: argparse.Namespace) -> None:
    level = getattr(logging, (ns.console_log_level or "INFO").upper(), logging.INFO)
    fmt = "%(message)s" if ns.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.FileHandler(ns.console_log_file) if ns.console_log_file else logging.StreamHandler()
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    # bitsandbytes warns on CPU-only machines about optional kernels it never needs here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for noisy in ("PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    from library.config_file import parse_with_config_file, write_output_config

    parser = setup_parser()
    ns = parse_with_config_file(parser, sys.argv[1:] if argv is None else argv)
    _setup_logging(ns)
    if ns.output_config:
        if not ns.config_file:
            parser.error("--output_config needs --config_file PATH to write to")
        try:
            write_output_config(parser, ns, Path(ns.config_file))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from library import run_stop
    from library.errors import EXIT_INTERRUPTED, UserError, exit_code_for

    command = [sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])]
    try:
        return _train(ns, command)
    except run_stop.RunStopped as exc:
        print(f"stopped by {exc}. The last complete checkpoint is intact; resume with --resume auto",
              file=sys.stderr)
        return exc.exit_code
    except UserError as exc:  # the one place errors become exit codes (library/errors.py lists them)
        print(f"error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact; resume with --resume auto", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(ns: argparse.Namespace, command: list[str]) -> int:
    from library import run_stop
    from library.preflight import run_preflight
    from library.settings import settings_from_args

    settings = settings_from_args(ns)
    if ns.debug_dataset:  # upstream's dry look at the data: before any lock, run record or model load
        from library.dataset_debug import show_dataset

        return show_dataset(settings)
    if not settings.hub.online:  # uploads (--huggingface_repo_id) need the Hub; nothing else downloads
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # FIX: never wait on a hub download mid-run
    # Every check that needs no weights, the output-folder lock (held until the end) and the run identity.
    plan = run_preflight(settings, command=command)
    try:
        for line in plan.messages if plan.is_main else []:
            print(line, flush=True)
        # FIX: SIGTERM to train.sh/accelerate left the trainer training on, re-parented, with its heartbeat unmarked.
        stopper = run_stop.install(settings.save.output_dir)
        try:
            from library.trainer import FluxLoRATrainer

            return FluxLoRATrainer(settings, plan).train()
        except BaseException:
            if stopper.request is not None:  # also when the stop came before the trainer could mark its heartbeat
                stopper.mark_heartbeat()
            raise
        finally:
            stopper.close()
    finally:
        plan.release()


if __name__ == "__main__":
    from library import run_stop
    from library.console_streams import tolerate_console_errors

    tolerate_console_errors()  # a closed terminal, a dead pipe reader or a full log disk must not end training
    run_stop.exit_process(main())
