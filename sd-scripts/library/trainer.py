"""The FLUX LoRA trainer: `FluxLoRATrainer.train()` reads as the table of contents.

Each phase is one method: output folder and guards, tokenizers, dataset, accelerator,
models, caches, network, optimizer, resume, the loop (in `library.train_loop`), final save.
Every wait that can hang runs under a bound from `library.hang_guards`; every file that
counts as a checkpoint is written atomically by `library.checkpoint_io`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import logging
import sys
from pathlib import Path

import torch

from library import (checkpoint_io, checkpoint_validation, continuation, hub_sync, metadata, precision,
                     regularisation, validation)
from library.heartbeat import Heartbeat
from library.hang_guards import HINTS, HangGuards
from library.settings import SettingsError, TrainSettings, total_steps

log = logging.getLogger(__name__)
REPO_DIR = Path(__file__).resolve().parents[2]
LOSS_LOG_ENV = "FLUXTRAIN_LOSS_LOG"  # tests: append "step,loss" per optimizer step to this file


def _is_cache_timeout(exc: BaseException) -> bool:
    # Raised in a DataLoader worker, the exception is rebuilt in the main process, maybe as another class.
    return type(exc).__name__ == "CacheReadTimeout" or "cache_io_timeout" in str(exc)


class _SilentHeartbeat:
    """Heartbeat stand-in for ranks other than the main one."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class TrainingPosition:
    """Where the run is: absolute optimizer steps, completed epochs, and the data cursor."""

    def __init__(self):
        self.step = 0
        self.epoch = 0           # 0-based epoch in progress
        self.batch_in_epoch = 0  # batches of that epoch already consumed

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


class FluxLoRATrainer:
    def __init__(self, settings: TrainSettings):
        self.s = settings
        self.pos = TrainingPosition()
        self.phase = "loading"
        self.sample_embeds: dict = {}
        self.val_dataset = None
        self.resumed_state: Path | None = None
        self.start_tracking(enabled=False)

    # ------------------------------------------------------------------ table of contents
    def train(self) -> int:
        self.setup_accelerator()
        self.prepare_output_dir()
        try:
            self.load_tokenizers()
            self.build_dataset()
            self.load_models()
            self.cache_latents()
            self.cache_text_encoder_outputs()
            self.create_network()
            self.create_optimizer()
            self.resume_if_requested()
            continuation.apply_initial_position(self)
            self.start_tracking()
            from library.train_loop import run_training_loop

            run_training_loop(self)
            self.save_final()
        except KeyboardInterrupt:
            self.heartbeat.failed("interrupted")
            raise
        except Exception as exc:
            if _is_cache_timeout(exc):
                self.guards.fire("cache_io", str(exc), HINTS["cache_io"])
            self.heartbeat.failed(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.tracker.close()
            self.guards.close()
        self.heartbeat.done()
        return 0

    # ------------------------------------------------------------------ phases
    def start_tracking(self, enabled: bool = True) -> None:
        """The loss trackers (--logging_dir/--log_with) and the validation runner (--validation_split)."""
        from library.tracking import Tracker
        from library.validation import Validator

        self.tracker = Tracker(self.s.tracking, is_main=enabled and self.is_main, raw_flags=self.s.raw)
        self.validator = Validator(self, self.val_dataset if enabled else None)
        if enabled and self.resumed_state is not None:  # loss/average continues where the state left it
            self.tracker.recorder.restore_from_state(self.resumed_state)

    def prepare_output_dir(self) -> None:
        out = self.s.save.output_dir
        out.mkdir(parents=True, exist_ok=True)
        from library import atomic_io

        if self.is_main:
            # A run killed between the two renames that replace NAME-state gets that checkpoint back.
            for leftover in atomic_io.cleanup_leftovers(out, is_complete=checkpoint_validation.is_complete_staged):
                log.warning("removed an unfinished checkpoint left by a killed run: %s", leftover)
        # One heartbeat per run: the main process speaks for all ranks (its pid owns the process tree).
        # Step updates are throttled to two a second (phase changes always write): a monitor needs no more,
        # and a write per step is measurable on fast small-model steps.
        self.heartbeat = Heartbeat(out, min_interval=0.5) if self.is_main else _SilentHeartbeat()
        self.hub = hub_sync.HubSync(self.s.hub, timeout=self.s.guards.save_timeout)
        self.guards = HangGuards(out, self.heartbeat, stall_dump_timeout=self.s.guards.stall_dump_timeout,
                                 position=lambda: {"phase": self.phase, **self.pos.as_dict()})
        self.set_phase("loading", "loading models")
        loss_log = os.environ.get(LOSS_LOG_ENV)
        self.loss_log = open(loss_log, "a", encoding="utf-8") if loss_log else None

    def set_phase(self, phase: str, message: str = "") -> None:
        self.phase = phase
        self.heartbeat.phase(phase, message)
        self.guards.progress()

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        handlers = []
        if self.s.guards.ddp_timeout_minutes:
            handlers.append(InitProcessGroupKwargs(timeout=_dt.timedelta(minutes=self.s.guards.ddp_timeout_minutes)))
        print("preparing accelerator", flush=True)
        # Without cpu=True, processes started by `accelerate launch`/torchrun on a machine with no CUDA
        # each see a world of one (measured, deps-notes §9); with it they form a gloo group.
        self.accelerator = Accelerator(mixed_precision=self.s.run.mixed_precision, kwargs_handlers=handlers,
                                       cpu=not torch.cuda.is_available())
        print(f"accelerator device: {self.accelerator.device}")
        set_seed(self.s.run.seed)
        self.device = self.accelerator.device
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.s.run.mixed_precision,
                                                                               torch.float32)
        self.is_main = self.accelerator.is_main_process

    def barrier(self, what: str = "waiting for the other processes") -> None:
        """wait_for_everyone, bounded by --ddp_timeout so one stuck rank cannot park the others for 30 min."""
        if self.accelerator.num_processes == 1:
            return
        minutes = self.s.guards.ddp_timeout_minutes
        # FIX: one stuck rank held every other rank in this barrier for the backend's default 10-30 min.
        with self.guards.deadline("ddp", minutes * 60 if minutes else None, hint=HINTS["ddp"], detail=what):
            self.accelerator.wait_for_everyone()

    def load_tokenizers(self) -> None:
        from library import flux_tokenizers

        cache_dir = self.s.model.tokenizer_cache_dir
        self.clip_tokenizer = flux_tokenizers.load_clip_tokenizer(cache_dir)
        self.t5_tokenizer = flux_tokenizers.load_t5_tokenizer(cache_dir)

    def build_dataset(self) -> None:
        from library import dataset, dataset_config

        data = self.s.data
        if data.dataset_config:
            for flag, value in (("--train_data_dir", data.train_data_dir), ("--reg_data_dir", data.reg_data_dir)):
                if value:  # as upstream: the config file describes every folder
                    log.warning("--dataset_config is set: %s is ignored (use is_reg = true in a subset)", flag)
            print(f"Loading dataset config from {data.dataset_config}")
            blueprints = dataset_config.load_dataset_config(data.dataset_config, cli=data.cli_fallbacks)
        else:
            blueprints = dataset_config.blueprints_from_train_data_dir(data.train_data_dir, cli=data.cli_fallbacks,
                                                                       reg_data_dir=data.reg_data_dir)
        dataset_config.check_text_encoder_cache(blueprints, data)
        dataset_config.check_masked_loss(blueprints, self.s.regularisation.masked_loss)
        self.blueprints = blueprints
        self.dataset = dataset.build_dataset(blueprints, seed=self.s.run.seed, prior_loss_weight=data.prior_loss_weight)
        self.dataset, self.val_dataset = validation.split_dataset(self.dataset, self.s.validation)
        world = self.accelerator.num_processes
        self.batches_per_epoch = -(-self.dataset.num_batches_per_epoch // world)
        self.max_train_steps, self.num_epochs = total_steps(self.s.run.max_train_steps, self.s.run.max_train_epochs,
                                                            self.batches_per_epoch)
        if self.s.run.max_train_epochs and self.is_main:
            print(f"override steps. steps for {self.num_epochs} epochs is: {self.max_train_steps}")
        continuation.plan_run(self)

    def load_models(self) -> None:
        from library import flux_loading

        m = self.s.model
        self.model_info = flux_loading.analyze_flux_checkpoint(m.dit_path)
        self.t5_max_length = m.t5xxl_max_token_length or (256 if self.model_info.is_schnell else 512)
        print(f"t5xxl_max_token_length: {self.t5_max_length}")
        self.model_hasher = metadata.ModelHasher(m.dit_path)
        self.transformer = flux_loading.load_flow_model(m.dit_path, dtype=self.weight_dtype, device="cpu",
                                                        fp8=m.fp8_base, disable_mmap=m.disable_mmap)
        self.transformer.requires_grad_(False)
        te_dtype = self.weight_dtype
        self.clip_l = flux_loading.load_clip_l(m.clip_l_path, dtype=te_dtype).requires_grad_(False)
        self.t5 = flux_loading.load_t5xxl(m.t5xxl_path, dtype=te_dtype).requires_grad_(False)
        self.ae = flux_loading.load_ae(m.ae_path, dtype=self.weight_dtype).requires_grad_(False)
        self.train_clip = not self.s.network.train_unet_only
        from library.text_encoding import FluxTextEncoder

        self.text_encoder = FluxTextEncoder(self.clip_tokenizer, self.t5_tokenizer, self.clip_l, self.t5,
                                            t5_max_length=self.t5_max_length,
                                            apply_t5_attn_mask=m.apply_t5_attn_mask)

    def cache_latents(self) -> None:
        from library import caching, flux_loading

        self.set_phase("caching_latents", "encoding images with the autoencoder")
        self.ae.to(self.device)
        generator = torch.Generator().manual_seed(self.s.run.seed)

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                images = images.to(self.device, self.weight_dtype)
                return flux_loading.encode_latents(self.ae, images, generator).float().cpu()

        to_disk = self.s.data.cache_latents_to_disk
        with self.main_process_first(to_disk, "waiting for the main process to cache latents"):
            self.latent_cache = caching.cache_latents(
                self.dataset, encode, to_disk=to_disk,
                batch_size=self.s.data.vae_batch_size, io_timeout=self.s.guards.cache_io_timeout,
                fingerprint=caching.file_identity(self.s.model.ae_path))
        self.ae.to("cpu")
        self.barrier()

    @contextlib.contextmanager
    def main_process_first(self, shared_files: bool, what: str):
        """With caches on disk, the main process writes them and the other ranks then only read them."""
        first = shared_files and self.accelerator.num_processes > 1
        if first and not self.is_main:
            self.barrier(what)
        yield
        if first and self.is_main:
            self.barrier(what)

    def text_fingerprint(self) -> str:
        from library import caching

        parts = [caching.file_identity(self.s.model.clip_l_path), caching.file_identity(self.s.model.t5xxl_path),
                 type(self.t5_tokenizer).__name__, str(len(self.t5_tokenizer)), str(len(self.clip_tokenizer)),
                 str(self.t5_max_length)]
        return "|".join(parts)

    def cache_text_encoder_outputs(self) -> None:
        from library import caching

        self.set_phase("caching_text", "encoding captions")
        self.clip_l.to(self.device)
        self.t5.to(self.device)
        self.te_cache = None
        if self.s.data.cache_text_encoder_outputs:
            def encode(captions: list[str]) -> dict:
                with torch.no_grad():
                    out = self.text_encoder.encode(captions)
                return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

            to_disk = self.s.data.cache_text_encoder_outputs_to_disk
            with self.main_process_first(to_disk, "waiting for the main process to cache text encoder outputs"):
                self.te_cache = caching.cache_text_encoder_outputs(
                    self.dataset, encode, to_disk=to_disk,
                    fingerprint=self.text_fingerprint(), apply_t5_attn_mask=self.s.model.apply_t5_attn_mask,
                    batch_size=self.s.data.text_encoder_batch_size or self.blueprints[0].batch_size,
                    io_timeout=self.s.guards.cache_io_timeout)
        self.dataset.set_caches(self.latent_cache, self.te_cache)
        self.encode_sample_prompts()
        if self.te_cache is not None:
            # T5 is never trained: once its outputs are cached it only costs memory.
            self.t5.to("cpu")
            self.text_encoder.t5_model = None
            del self.t5
            if not self.train_clip:
                self.clip_l.to("cpu")
            gc.collect()
        self.barrier()

    def encode_sample_prompts(self) -> None:
        if not self.s.sample.enabled:
            return
        from library import sampling

        self.sample_prompts = sampling.parse_sample_prompts(self.s.sample.prompts)
        with torch.no_grad():
            for prompt in self.sample_prompts:
                for text in prompt.texts_to_encode():
                    if text not in self.sample_embeds:
                        print(f"cache Text Encoder outputs for prompt: {text}")
                        self.sample_embeds[text] = self.text_encoder.encode([text])

    def create_network(self) -> None:
        from networks import lora_flux

        net = self.s.network
        self.set_phase("loading", "creating the LoRA network")
        print(f"create LoRA network. base dim (rank): {net.dim}, alpha: {net.alpha}")
        clip = self.clip_l if self.train_clip else None
        continuation.merge_base_weights(self)
        self.network = lora_flux.create_network(1.0, net.dim, net.alpha, self.ae, [clip, None], self.transformer,
                                                neuron_dropout=self.s.regularisation.network_dropout, **net.args)
        self.network.apply_to([clip, None], self.transformer, apply_text_encoder=self.train_clip, apply_unet=True)
        if net.weights:
            # As upstream (strict=False): load what both sides have, say what was not matched.
            missing, extra = self.network.load_weights(net.weights, strict=False)
            print(f"loaded network weights from {net.weights}")
            if missing:
                log.warning("--network_weights: %d modules of this network are not in the file (they start "
                            "from their initial values), e.g. %s", len(missing), missing[0])
            if extra:
                log.warning("--network_weights: %d keys of the file are not in this network (ignored), e.g. %s",
                            len(extra), extra[0])
        if not self.s.run.blocks_to_swap:
            self.transformer.to(self.device)
        if self.train_clip:
            self.clip_l.to(self.device)
        self.setup_block_swap()  # with swapping, only the blocks that stay resident go to the device
        if self.s.run.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            if self.train_clip:
                self.clip_l.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.clip_l.train()  # transformers checkpoints only in train mode; CLIP-L has no dropout
        self.network.to(self.device)
        self.network_drops = regularisation.network_drops(self.network)
        precision.prepare_network(self)

    def setup_block_swap(self) -> None:
        self.block_swapper = None
        if not self.s.run.blocks_to_swap:
            return
        from library.offloading import BlockSwapper

        print(f"enable block swap: blocks_to_swap={self.s.run.blocks_to_swap}")
        self.block_swapper = BlockSwapper(
            self.transformer, self.s.run.blocks_to_swap, self.device, timeout=self.s.guards.block_swap_timeout,
            on_timeout=lambda detail: self.guards.fire("block_swap", detail, HINTS["block_swap"]))
        self.block_swapper.move_to_device_except_swapped()
        if not self.s.run.gradient_checkpointing:
            log.warning("--blocks_to_swap saves little memory without --gradient_checkpointing: autograd keeps "
                        "each block's weights alive until backward")

    def create_optimizer(self) -> None:
        from library import optim

        print("prepare optimizer, data loader etc.")
        opt = self.s.optimizer
        groups = self.network.prepare_optimizer_params(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
        self.optimizer = optim.create_optimizer(opt, groups)
        self.optimizer_name = optim.describe_optimizer(self.optimizer, opt)
        print(f"use {self.optimizer_name} optimizer | {opt.args}")
        self.lr_scheduler = optim.create_scheduler(opt, self.optimizer, self.max_train_steps,
                                                   self.accelerator.num_processes)
        self.network, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.network, self.optimizer, self.lr_scheduler)
        self.trainable_params = [p for p in self.accelerator.unwrap_model(self.network).parameters()
                                 if p.requires_grad]
        self.base_metadata = metadata.build_training_metadata(
            self.s, optimizer_name=self.optimizer_name, num_train_images=self.dataset.num_train_images,
            num_batches_per_epoch=self.batches_per_epoch, num_epochs=self.num_epochs,
            max_train_steps=self.max_train_steps, is_schnell=self.model_info.is_schnell,
            datasets=self.describe_datasets(), repo_dir=REPO_DIR, items=self.dataset.items,
            legacy_model_hash=self.model_hasher.legacy)

    def describe_datasets(self) -> list[dict]:
        result = []
        for bp in self.blueprints:
            result.append({"resolution": list(bp.resolution), "batch_size_per_device": bp.batch_size,
                           "enable_bucket": bp.enable_bucket,
                           "subsets": [{"image_dir": Path(sub.image_dir).name, "num_repeats": sub.num_repeats,
                                        "class_tokens": sub.class_tokens, **metadata.subset_options(sub)}
                                       for sub in bp.subsets]})
        return result

    def resume_if_requested(self) -> None:
        target = self.s.save.resume
        if not target:
            return
        out = self.s.save.output_dir
        if self.s.hub.resume_from_hub:
            target = str(hub_sync.download_state(self.s.hub, target, out))
        if target != "auto":
            path = Path(target)
            if not path.is_dir():
                raise SettingsError(f"--resume {target}: not a state folder (expected NAME-...-state). "
                                    f"List candidates with: python tools/find_checkpoint.py {out} --list")
            self.restore_state(checkpoint_io.load_state_folder(path, accelerator=self.accelerator,
                                                               resume_settings=self.s.resume_settings()))
            return
        # --resume auto: newest valid state by step; one that fails to load falls back to the next older.
        for candidate in checkpoint_validation.iter_valid_states(out, self.s.save.output_name):
            try:
                info = checkpoint_io.load_state_folder(candidate.path, accelerator=self.accelerator,
                                                       resume_settings=self.s.resume_settings())
            except checkpoint_io.CheckpointLoadError as exc:
                log.warning("--resume auto: skipping %s: %s", candidate.path, exc)
                continue
            self.restore_state(info)
            return
        print(f"--resume auto: no valid state folder in {out}; starting from scratch")

    def restore_state(self, info) -> None:
        for warning in info.warnings:
            log.warning("resume: %s", warning)
        self.pos.step = info.step
        position = info.data_position or {}
        if "epoch" in position:
            self.pos.epoch = int(position["epoch"])
            self.pos.batch_in_epoch = int(position.get("batch_in_epoch", 0))
        else:  # an upstream-made state: derive the cursor from the absolute step
            self.pos.epoch, self.pos.batch_in_epoch = divmod(info.step, self.batches_per_epoch)
        if self.pos.batch_in_epoch >= self.batches_per_epoch:
            self.pos.epoch, self.pos.batch_in_epoch = self.pos.epoch + 1, 0
        print(f"resumed from {info.path}: step {self.pos.step}, epoch {self.pos.epoch + 1}, "
              f"batch {self.pos.batch_in_epoch} of {self.batches_per_epoch}")
        self.heartbeat.checkpoint(str(info.path))
        self.resumed_state = info.path

    def record_loss(self, loss: float) -> None:
        self.tracker.log_step(self, loss)
        if self.loss_log is not None:
            # repr() keeps every bit of the float, so runs can be compared exactly.
            self.loss_log.write(f"{self.pos.step},{loss!r}\n")
            self.loss_log.flush()

    # ------------------------------------------------------------------ saving
    def lora_tensors(self) -> dict[str, torch.Tensor]:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(
            self.s.save.save_precision or "", None)
        return self.accelerator.unwrap_model(self.network).kohya_state_dict(dtype)

    def save_checkpoint(self, *, kind: str, with_state: bool) -> None:
        """Write the LoRA file (and state folder) for this point of the run: kind epoch|step|last."""
        self.barrier()
        if not self.is_main:
            return
        name, out = self.s.save.output_name, self.s.save.output_dir
        record = self.validator.checkpoint_record(self)  # the validation loss at this step, if any
        self.tracker.flush()
        previous_phase = self.phase
        self.set_phase("saving", f"saving {kind} checkpoint")
        # FIX: saving had no bound (a stuck disk or network share froze the run); saves are atomic, so ending
        # the run on --save_timeout leaves the previous checkpoint intact.
        with self.guards.deadline("save", self.s.guards.save_timeout, hint=HINTS["save"]):
            # The names come from the module discovery uses, so what is written is what resume finds.
            number = {"epoch": {"epoch": self.pos.epoch}, "step": {"step": self.pos.step}}.get(kind, {})
            file_name = checkpoint_validation.lora_file_name(name, **number)
            state_name = checkpoint_validation.state_dir_name(name, **number)
            if with_state:
                self.write_state(out / state_name, kind, record)
            meta = metadata.metadata_for_save(self.base_metadata, step=self.pos.step, epoch=self.completed_epochs(),
                                              model_hash=self.model_hasher.value, minimal=self.s.save.no_metadata)
            meta.update(validation.lora_metadata(record))
            print(f"saving checkpoint: {out / file_name}")
            checkpoint_io.save_lora_file(out / file_name, self.lora_tensors(), meta)
            self.rotate()
        self.hub.after_save(out / file_name, out / state_name if with_state else None, final=kind == "last")
        self.set_phase(previous_phase if previous_phase != "saving" else "training")

    def completed_epochs(self) -> int:
        return self.pos.epoch if self.pos.batch_in_epoch < self.batches_per_epoch else self.pos.epoch + 1

    def upstream_current_epoch(self) -> int:
        """train_state.json's current_epoch: the 1-based epoch in progress (the finished one at an epoch end)."""
        if self.pos.batch_in_epoch == 0 and self.pos.epoch > 0:
            return self.pos.epoch
        return self.pos.epoch + 1

    def write_state(self, final_dir: Path, kind: str, validation_record: dict | None = None) -> None:
        print(f"saving state at {'step ' + str(self.pos.step) if kind == 'step' else 'epoch ' + str(self.pos.epoch)}")
        checkpoint_io.save_state_folder(
            final_dir, accelerator=self.accelerator, output_name=self.s.save.output_name, step=self.pos.step,
            epoch=self.completed_epochs(),
            data_position={"epoch": self.pos.epoch, "batch_in_epoch": self.pos.batch_in_epoch},
            resume_settings=self.s.resume_settings(), args_digest=self.s.args_digest(),
            current_epoch_1based=self.upstream_current_epoch(),
            extra={"validation": validation_record, "loss_recorder": self.tracker.recorder.state()})
        self.heartbeat.checkpoint(str(final_dir))

    def rotate(self) -> None:
        save = self.s.save
        checkpoint_io.rotate(save.output_dir, save.output_name, last_n_epochs=save.last_n_epochs,
                             last_n_epochs_state=save.last_n_epochs_state or save.last_n_epochs,
                             last_n_steps=save.last_n_steps, last_n_steps_state=save.last_n_steps_state)

    def save_final(self) -> None:
        with_state = self.s.save.save_state or self.s.save.save_state_on_train_end
        if with_state and self.is_main:
            print("saving last state.")
        self.save_checkpoint(kind="last", with_state=with_state)
        if self.block_swapper is not None:
            self.block_swapper.close()
        self.accelerator.end_training()
        if self.is_main:
            print("model saved.")
        sys.stdout.flush()
