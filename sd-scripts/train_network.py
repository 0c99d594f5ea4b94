"""Upstream-compatible home of `setup_parser()` for network (LoRA) training.

FluxGym imports this module and `library.flux_train_utils` to build its advanced-options
panel, so the function names and the flag subset they expose match upstream sd-scripts.
Training itself lives in `flux_train_network.py` and `library.trainer`.
"""
from __future__ import annotations

import argparse

from library import args as flags


def setup_parser() -> argparse.ArgumentParser:
    """The shared network-training flags (without the FLUX and DiT groups), as upstream."""
    parser = argparse.ArgumentParser(description="FLUX LoRA trainer (sd-scripts compatible)")
    flags.add_model_arguments(parser)
    flags.add_dataset_arguments(parser)
    flags.add_training_arguments(parser)
    flags.add_optimizer_arguments(parser)
    flags.add_network_arguments(parser)
    flags.add_logging_arguments(parser)
    flags.add_validation_arguments(parser)
    flags.add_precision_arguments(parser)
    flags.add_continuation_arguments(parser)
    flags.add_caption_arguments(parser)
    flags.add_regularisation_arguments(parser)
    flags.add_hub_arguments(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit("train_network.py only provides setup_parser(); run flux_train_network.py to train FLUX LoRA.")
