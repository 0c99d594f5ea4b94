"""The run's state as typed objects: what the phases build and the training loop reads.

`TrainSession` is filled phase by phase (`FluxLoRATrainer.train()`): tokenizers, data, models,
optimization. The loop (`library.train_loop`) receives the session, a `Checkpointer` and the
`RunControl` (heartbeat, hang guards, phase, barriers), never the trainer itself.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, TextIO

from library import run_stop
from library.checkpoint_io import ResumeInfo
from library.hang_guards import HangGuards
from library.run_identity import RunIdentity
from library.settings import TrainSettings

log = logging.getLogger(__name__)


class TrainingPosition:
    """Where the run is: absolute optimizer steps, completed epochs, and the data cursor."""

    def __init__(self):
        self.step = 0
        self.epoch = 0           # 0-based epoch in progress
        self.batch_in_epoch = 0  # batches of that epoch already consumed

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


@dataclasses.dataclass
class Tokenizers:
    clip: Any
    t5: Any


@dataclasses.dataclass
class DataPlan:
    """The dataset and how many steps it makes; caches are attached once built."""

    blueprints: list
    dataset: Any
    batches_per_epoch: int  # per process
    max_train_steps: int
    num_epochs: int
    latent_cache: Any = None
    te_cache: Any = None
    val_dataset: Any = None  # the held-out part (--validation_split), or None


@dataclasses.dataclass
class Models:
    info: Any  # flux_loading.FluxModelInfo
    transformer: Any
    clip_l: Any
    t5: Any  # None once its outputs are cached
    ae: Any
    text_encoder: Any  # text_encoding.FluxTextEncoder
    train_clip: bool
    t5_max_length: int
    hasher: Any  # metadata.ModelHasher
    block_swapper: Any = None


@dataclasses.dataclass
class Optimization:
    network: Any
    optimizer: Any
    lr_scheduler: Any
    trainable_params: list
    optimizer_name: str
    base_metadata: dict
    network_drops: bool = False  # rank/module/neuron dropout: steps seed the global RNG (exact resume)
    fused: Any = None  # library.fused_backward.FusedBackward with --fused_backward_pass: steps run in backward


@dataclasses.dataclass
class Samples:
    prompts: list = dataclasses.field(default_factory=list)
    embeds: dict = dataclasses.field(default_factory=dict)  # prompt text -> cached text-encoder outputs


@dataclasses.dataclass
class TrainSession:
    settings: TrainSettings
    accelerator: Any
    device: Any
    weight_dtype: Any
    run: RunIdentity | None  # decided by the preflight (other processes: read once the main one recorded it)
    resume: ResumeInfo | None  # the state folder to continue from, decided and checked by the preflight
    pos: TrainingPosition = dataclasses.field(default_factory=TrainingPosition)
    tokenizers: Tokenizers | None = None
    data: DataPlan | None = None
    models: Models | None = None
    opt: Optimization | None = None
    samples: Samples = dataclasses.field(default_factory=Samples)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def completed_epochs(self) -> int:
        pos = self.pos
        return pos.epoch if pos.batch_in_epoch < self.data.batches_per_epoch else pos.epoch + 1


class SilentHeartbeat:
    """Heartbeat stand-in for ranks other than the main one."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class RunControl:
    """Heartbeat, hang guards, the phase and bounded barriers: shared by the phases, the loop and the saver."""

    def __init__(self, *, heartbeat, guards: HangGuards, accelerator, ddp_timeout_minutes: float | None,
                 loss_log: TextIO | None, tracker=None, hub=None):
        self.heartbeat = heartbeat
        self.guards = guards
        self.accelerator = accelerator
        self.ddp_timeout_minutes = ddp_timeout_minutes
        self.loss_log = loss_log
        self.tracker = tracker  # library.tracking.Tracker: TensorBoard/wandb (a no-op one without --log_with)
        self.hub = hub  # library.hub_sync.HubSync: uploads after each save (a no-op one without a repo)
        self.validator = None  # library.validation.Validator, once the dataset is split
        self.bar_postfix: dict = {}  # extra progress-bar figures of the last step (--scale_weight_norms)
        self.phase = "loading"

    def set_phase(self, phase: str, message: str = "") -> None:
        run_stop.check()  # a safe point: a requested stop ends the run here
        self.phase = phase
        self.heartbeat.phase(phase, message)
        self.guards.progress()

    def ddp_deadline(self, what: str):
        minutes = self.ddp_timeout_minutes
        return self.guards.deadline("ddp", minutes * 60 if minutes else None, detail=what)

    def barrier(self, what: str = "waiting for the other processes") -> None:
        """wait_for_everyone, bounded by --ddp_timeout so one stuck rank cannot park the others for 30 min."""
        if self.accelerator.num_processes == 1:
            return
        # FIX: one stuck rank held every other rank in this barrier for the backend's default 10-30 min.
        with self.ddp_deadline(what):
            self.accelerator.wait_for_everyone()

    def record_loss(self, step: int, loss: float) -> None:
        if self.loss_log is not None:
            # repr() keeps every bit of the float, so runs can be compared exactly.
            self.loss_log.write(f"{step},{loss!r}\n")
            self.loss_log.flush()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self.guards.close()
        if self.loss_log is not None:
            self.loss_log.close()
