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
    from library.settings import SettingsError, settings_from_args

    try:
        settings = settings_from_args(ns)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # FIX: never wait on a hub download mid-run
    from library.trainer import FluxLoRATrainer

    try:
        return FluxLoRATrainer(settings).train()
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact; resume with --resume auto", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if not _is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _is_user_error(exc: BaseException) -> bool:
    """Our own clear errors (bad file, bad flag, mismatch) print one line; anything else keeps its traceback."""
    names = {"SettingsError", "ModelFileError", "TokenizerNotFoundError", "DatasetConfigError",
             "ResumeMismatchError", "ConfigFileError", "CacheError", "CheckpointLoadError", "LoRAWeightsError",
             "SamplePromptError", "DatasetError"}
    return type(exc).__name__ in names or isinstance(exc, FileNotFoundError)


if __name__ == "__main__":
    from library.console_streams import tolerate_console_errors

    tolerate_console_errors()  # a closed terminal, a dead pipe reader or a full log disk must not end training
    sys.exit(main())
