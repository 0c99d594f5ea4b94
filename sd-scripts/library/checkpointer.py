"""Saving, rotating and resuming the run's checkpoints (the loop calls `save`; the trainer calls `resume`).

Names come from `checkpoint_validation` (what is written is what discovery finds); every file is written
atomically by `checkpoint_io`; each checkpoint records the run that wrote it (manifest `run_id`, LoRA
metadata `fluxtrain_run_id` / `fluxtrain_settings_hash`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from library import checkpoint_io, checkpoint_validation, console_markers, metadata, validation
from library.train_session import RunControl, TrainSession

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, session: TrainSession, control: RunControl):
        self.session = session
        self.control = control
        self.save_settings = session.settings.save

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Restore the state folder the preflight chose (weights, optimizer, scheduler, RNG) and the position."""
        info, s = self.session.resume, self.session
        if info is None:
            return
        checkpoint_io.restore_state_folder(info, accelerator=s.accelerator)
        for warning in info.warnings:
            log.warning("resume: %s", warning)
        pos, per_epoch = s.pos, s.data.batches_per_epoch
        pos.step = info.step
        position = info.data_position or {}
        if "epoch" in position:
            pos.epoch = int(position["epoch"])
            pos.batch_in_epoch = int(position.get("batch_in_epoch", 0))
        else:  # an upstream-made state: derive the cursor from the absolute step
            pos.epoch, pos.batch_in_epoch = divmod(info.step, per_epoch)
        if pos.batch_in_epoch >= per_epoch:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        print(f"resumed from {info.path}: step {pos.step}, epoch {pos.epoch + 1}, "
              f"batch {pos.batch_in_epoch} of {per_epoch}")
        self.control.heartbeat.checkpoint(str(info.path))

    # ------------------------------------------------------------------ save
    def lora_tensors(self) -> dict[str, torch.Tensor]:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(
            self.save_settings.save_precision or "", None)
        return self.session.accelerator.unwrap_model(self.session.opt.network).kohya_state_dict(dtype)

    def save(self, *, kind: str, with_state: bool) -> None:
        """Write the LoRA file (and state folder) for this point of the run: kind epoch|step|last."""
        s, control = self.session, self.control
        control.barrier()
        if not s.is_main:
            return
        name, out, pos = self.save_settings.output_name, self.save_settings.output_dir, s.pos
        record = control.validator.checkpoint_record(s) if control.validator else {}  # validation loss now
        if control.tracker is not None:
            control.tracker.flush()
        previous_phase = control.phase
        control.set_phase("saving", f"saving {kind} checkpoint")
        # FIX: saving had no bound (a stuck disk or network share froze the run); saves are atomic, so ending
        # the run on --save_timeout leaves the previous checkpoint intact.
        with control.guards.deadline("save", s.settings.guards.save_timeout):
            number = {"epoch": {"epoch": pos.epoch}, "step": {"step": pos.step}}.get(kind, {})
            file_name = checkpoint_validation.lora_file_name(name, **number)
            state_name = checkpoint_validation.state_dir_name(name, **number)
            if with_state:
                self.write_state(out / state_name, kind, record)
            meta = metadata.metadata_for_save(s.opt.base_metadata, step=pos.step, epoch=s.completed_epochs(),
                                              model_hash=s.models.hasher.value, minimal=self.save_settings.no_metadata)
            meta.update(self.run_metadata())
            meta.update(validation.lora_metadata(record))
            print(console_markers.SAVING_CHECKPOINT.format(path=out / file_name))
            checkpoint_io.save_lora_file(out / file_name, self.lora_tensors(), meta)
            self.rotate()
        if control.hub is not None:
            control.hub.after_save(out / file_name, out / state_name if with_state else None, final=kind == "last")
        control.set_phase(previous_phase if previous_phase != "saving" else "training")

    def run_metadata(self) -> dict[str, str]:
        run = self.session.run
        if run is None:
            return {}
        return {checkpoint_validation.RUN_ID_KEY: str(run.run_id),
                checkpoint_validation.SETTINGS_HASH_KEY: run.settings_hash}

    def upstream_current_epoch(self) -> int:
        """train_state.json's current_epoch: the 1-based epoch in progress (the finished one at an epoch end)."""
        pos = self.session.pos
        if pos.batch_in_epoch == 0 and pos.epoch > 0:
            return pos.epoch
        return pos.epoch + 1

    def write_state(self, final_dir: Path, kind: str, validation_record: dict | None = None) -> None:
        s = self.session
        pos = s.pos
        what = f"step {pos.step}" if kind == "step" else f"epoch {pos.epoch}"
        print(console_markers.SAVING_STATE.format(what=what))
        checkpoint_io.save_state_folder(
            final_dir, accelerator=s.accelerator, output_name=self.save_settings.output_name, step=pos.step,
            epoch=s.completed_epochs(), data_position={"epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch},
            resume_settings=s.settings.resume_settings(), args_digest=s.settings.args_digest(),
            current_epoch_1based=self.upstream_current_epoch(), run_id=s.run.run_id if s.run else None,
            extra={"validation": validation_record,
                   "loss_recorder": self.control.tracker.recorder.state() if self.control.tracker else None})
        self.control.heartbeat.checkpoint(str(final_dir))

    def rotate(self) -> None:
        save = self.save_settings
        checkpoint_io.rotate(save.output_dir, save.output_name, last_n_epochs=save.last_n_epochs,
                             last_n_epochs_state=save.last_n_epochs_state or save.last_n_epochs,
                             last_n_steps=save.last_n_steps, last_n_steps_state=save.last_n_steps_state)
