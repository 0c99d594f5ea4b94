"""Compatibility names some tools import from upstream's `library.train_util`.

Only the checkpoint naming helpers live here; they are the contract that FluxGym forks,
resume scripts and our own tools rely on.
"""
from __future__ import annotations

EPOCH_STATE_NAME = "{}-{:06d}-state"
EPOCH_FILE_NAME = "{}-{:06d}"
STEP_STATE_NAME = "{}-step{:08d}-state"
STEP_FILE_NAME = "{}-step{:08d}"
LAST_STATE_NAME = "{}-state"


def get_epoch_ckpt_name(model_name: str, epoch_no: int, ext: str = ".safetensors") -> str:
    return EPOCH_FILE_NAME.format(model_name, epoch_no) + ext


def get_step_ckpt_name(model_name: str, step_no: int, ext: str = ".safetensors") -> str:
    return STEP_FILE_NAME.format(model_name, step_no) + ext


def get_last_ckpt_name(model_name: str, ext: str = ".safetensors") -> str:
    return model_name + ext
