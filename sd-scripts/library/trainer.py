"""The FLUX LoRA trainer: `FluxLoRATrainer.train()` reads as the table of contents.

The preflight (`library.preflight`) has already checked every input, chosen the resume target and the
run identity. Each phase here is one method that fills one part of the typed `TrainSession`
(`library.train_session`): accelerator, tokenizers, data, models, caches, network and optimizer; then the
`Checkpointer` restores the resume point and the loop (`library.train_loop`) runs on the session, the
checkpointer and the `RunControl`. Every wait that can hang runs under a bound from `library.hang_guards`;
every file that counts as a checkpoint is written atomically by `library.checkpoint_io`.
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

from library import (console_markers, continuation, hub_sync, image_augment, metadata, precision, regularisation,
                     run_stop, validation)
from library.checkpointer import Checkpointer
from library.heartbeat import Heartbeat
from library.hang_guards import HangGuards
from library.npz_io import CacheReadTimeout
from library.preflight import Preflight
from library.settings import TrainSettings, total_steps
from library.train_session import (DataPlan, Models, Optimization, RunControl, Tokenizers,
                                   TrainSession)

log = logging.getLogger(__name__)
REPO_DIR = Path(__file__).resolve().parents[2]
LOSS_LOG_ENV = "FLUXTRAIN_LOSS_LOG"  # tests: append "step,loss" per optimizer step to this file


class FluxLoRATrainer:
    def __init__(self, settings: TrainSettings, preflight: Preflight):
        self.s = settings
        self.preflight = preflight
        self.session: TrainSession | None = None  # from setup_accelerator on
        self.control: RunControl | None = None  # from prepare_output_dir on
        self.checkpointer: Checkpointer | None = None

    # ------------------------------------------------------------------ table of contents
    def train(self) -> int:
        self.setup_accelerator()
        self.prepare_output_dir()
        try:
            self.agree_on_run()
            self.load_tokenizers()
            self.build_dataset()
            self.load_models()
            self.cache_latents()
            self.cache_text_encoder_outputs()
            self.create_network()
            self.create_optimizer()
            self.checkpointer.resume()
            continuation.apply_initial_position(self.session)
            self.start_tracking()
            from library.train_loop import run_training_loop

            run_training_loop(self.session, self.checkpointer, self.control)
            self.save_final()
        except run_stop.RunStopped as exc:
            self.control.heartbeat.stopped(exc.signal_name, exc.detail)
            raise
        except KeyboardInterrupt:
            self.control.heartbeat.failed("interrupted")
            raise
        except Exception as exc:
            if (stop := run_stop.requested()) is not None:  # e.g. a collective broken by a peer that stopped
                self.control.heartbeat.stopped(stop.signal_name, stop.detail)
                raise stop from exc
            if isinstance(exc, CacheReadTimeout):  # a cache read of the caching phase: same exit as any guard
                self.control.guards.fire_from_exception("cache_io", exc)
            self.control.heartbeat.failed(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.control.close()
        self.control.heartbeat.done()
        return 0

    # ------------------------------------------------------------------ phases
    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        handlers = []
        if self.s.guards.ddp_timeout_minutes:
            handlers.append(InitProcessGroupKwargs(timeout=_dt.timedelta(minutes=self.s.guards.ddp_timeout_minutes)))
        print("preparing accelerator", flush=True)
        # Without cpu=True, processes started by `accelerate launch`/torchrun on a machine with no CUDA
        # each see a world of one (measured, deps-notes §9); with it they form a gloo group.
        accelerator = Accelerator(mixed_precision=self.s.run.mixed_precision, kwargs_handlers=handlers,
                                  cpu=not torch.cuda.is_available())
        print(f"accelerator device: {accelerator.device}")
        if accelerator.device.type == "cuda":
            # FIX: on an H200 (torch 2.11 + CUDA 13) the cuDNN attention backend that SDPA picks by
            # default on Hopper faulted in the backward pass of the second step ("illegal memory access",
            # mha_graph.execute) and killed every run; flash / memory-efficient SDPA train the same math.
            torch.backends.cuda.enable_cudnn_sdp(False)
        set_seed(self.s.run.seed)
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.s.run.mixed_precision, torch.float32)
        self.session = TrainSession(settings=self.s, accelerator=accelerator, device=accelerator.device,
                                    weight_dtype=weight_dtype, run=self.preflight.run, resume=self.preflight.resume)

    def prepare_output_dir(self) -> None:
        session, out = self.session, self.s.save.output_dir
        # Every rank beats into its own file (heartbeat.json for rank 0): a supervisor sees a rank that froze.
        # Step updates are throttled to two a second (phase changes always write): a monitor needs no more,
        # and a write per step is measurable on fast small-model steps.
        heartbeat = Heartbeat(out, min_interval=0.5, rank=session.rank)
        run_stop.attach_heartbeat(heartbeat)
        if session.run is not None:
            heartbeat.identify(session.run.run_id, session.run.settings_hash)
        guards = HangGuards(out, heartbeat, stall_dump_timeout=self.s.guards.stall_dump_timeout,
                            position=lambda: {"phase": self.control.phase, **session.pos.as_dict()})
        loss_log = os.environ.get(LOSS_LOG_ENV)
        self.control = RunControl(heartbeat=heartbeat, guards=guards, accelerator=session.accelerator,
                                  ddp_timeout_minutes=self.s.guards.ddp_timeout_minutes,
                                  loss_log=open(loss_log, "a", encoding="utf-8") if loss_log else None,
                                  hub=hub_sync.HubSync(self.s.hub, timeout=self.s.guards.save_timeout))
        self.checkpointer = Checkpointer(session, self.control)
        self.control.set_phase("loading", "loading models")

    def start_tracking(self) -> None:
        """The loss trackers (--logging_dir/--log_with) and the validation runner (--validation_split)."""
        from library.tracking import Tracker
        from library.validation import Validator

        session, control = self.session, self.control
        control.tracker = Tracker(self.s.tracking, is_main=session.is_main, raw_flags=self.s.raw)
        control.validator = Validator(session, session.data.val_dataset)
        if session.resume is not None:  # loss/average continues where the state left it
            control.tracker.recorder.restore_from_state(session.resume.path)

    def agree_on_run(self) -> None:
        from library.rank_agreement import agree_on_run

        agree_on_run(self.session, self.control)

    def load_tokenizers(self) -> None:
        from library import flux_tokenizers

        cache_dir = self.s.model.tokenizer_cache_dir
        self.session.tokenizers = Tokenizers(clip=flux_tokenizers.load_clip_tokenizer(cache_dir),
                                             t5=flux_tokenizers.load_t5_tokenizer(cache_dir))

    def build_dataset(self) -> None:
        from library import dataset

        session, blueprints = self.session, self.preflight.blueprints
        if self.s.data.dataset_config:
            print(f"Loading dataset config from {self.s.data.dataset_config}")
        data = dataset.build_dataset(blueprints, seed=self.s.run.seed, prior_loss_weight=self.s.data.prior_loss_weight)
        data, val_dataset = validation.split_dataset(data, self.s.validation, blueprints)
        world = session.world
        batches_per_epoch = -(-data.num_batches_per_epoch // world)
        max_train_steps, num_epochs = total_steps(self.s.run.max_train_steps, self.s.run.max_train_epochs,
                                                  batches_per_epoch)
        session.data = DataPlan(blueprints, data, batches_per_epoch, max_train_steps, num_epochs,
                                val_dataset=val_dataset)
        if session.is_main:
            if world > 1:
                print(f"batches: {data.num_batches_per_epoch} per epoch split over {world} processes = "
                      f"{batches_per_epoch} steps per epoch")
            if self.s.run.max_train_epochs:
                print(f"override steps. steps for {num_epochs} epochs is: {max_train_steps}")
        planned = continuation.plan_run(session)  # --save_n_epoch_ratio becomes a save cadence here
        if planned is not self.s:
            self.s = session.settings = planned
            self.checkpointer.save_settings = planned.save

    def load_models(self) -> None:
        from library import flux_loading, flux_time_inputs
        from library.text_encoding import FluxTextEncoder

        m, session = self.s.model, self.session
        info = flux_loading.analyze_flux_checkpoint(m.dit_path)
        t5_max_length = m.t5xxl_max_token_length or (256 if info.is_schnell else 512)
        print(f"t5xxl_max_token_length: {t5_max_length}")
        hasher = metadata.ModelHasher(m.dit_path)
        transformer = flux_loading.load_flow_model(m.dit_path, dtype=session.weight_dtype, device="cpu",
                                                   fp8=m.fp8_base, disable_mmap=m.disable_mmap)
        transformer.requires_grad_(False)
        if self.s.flow.bypass_guidance and not flux_time_inputs.allow_guidance_bypass(transformer):
            log.warning("--bypass_flux_guidance: %s has no guidance embedder (a FLUX.1 schnell-like model), so "
                        "there is nothing to bypass; training is the same as without the flag", m.dit_path)
        te_dtype = session.weight_dtype
        clip_l = flux_loading.load_clip_l(m.clip_l_path, dtype=te_dtype).requires_grad_(False)
        t5 = flux_loading.load_t5xxl(m.t5xxl_path, dtype=te_dtype).requires_grad_(False)
        ae = flux_loading.load_ae(m.ae_path, dtype=session.weight_dtype).requires_grad_(False)
        tok = session.tokenizers
        text_encoder = FluxTextEncoder(tok.clip, tok.t5, clip_l, t5, t5_max_length=t5_max_length,
                                       apply_t5_attn_mask=m.apply_t5_attn_mask, weighted_captions=m.weighted_captions)
        session.models = Models(info=info, transformer=transformer, clip_l=clip_l, t5=t5, ae=ae,
                                text_encoder=text_encoder, train_clip=not self.s.network.train_unet_only,
                                t5_max_length=t5_max_length, hasher=hasher)

    def cache_latents(self) -> None:
        from library import caching, flux_loading

        session, models = self.session, self.session.models
        if image_augment.needs_live_images(session.data.dataset.items, cache_flag=self.s.data.latent_cache_flag):
            # random_crop/color_aug/face crop: the AE stays on the device and encodes each batch in the step
            print("per-step image augmentation: images are encoded every step (no latent cache)", flush=True)
            models.ae.to(session.device)
            session.data.dataset.live_images = True
            return
        self.control.set_phase("caching_latents", "encoding images with the autoencoder")
        models.ae.to(session.device)
        generator = torch.Generator().manual_seed(self.s.run.seed)

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                images = images.to(session.device, session.weight_dtype)
                return flux_loading.encode_latents(models.ae, images, generator).float().cpu()

        to_disk = self.s.data.cache_latents_to_disk
        with self.main_process_first(to_disk, "waiting for the main process to cache latents"):
            session.data.latent_cache = caching.cache_latents(
                session.data.dataset, encode, to_disk=to_disk,
                batch_size=self.s.data.vae_batch_size, io_timeout=self.s.guards.cache_io_timeout,
                fingerprint=caching.file_identity(self.s.model.ae_path))
        models.ae.to("cpu")
        self.control.barrier()

    @contextlib.contextmanager
    def main_process_first(self, shared_files: bool, what: str):
        """With caches on disk, the main process writes them and the other ranks then only read them."""
        first = shared_files and self.session.world > 1
        if first and not self.session.is_main:
            self.control.barrier(what)
        yield
        if first and self.session.is_main:
            self.control.barrier(what)

    def text_fingerprint(self) -> str:
        from library import caching

        tok, models = self.session.tokenizers, self.session.models
        parts = [caching.file_identity(self.s.model.clip_l_path), caching.file_identity(self.s.model.t5xxl_path),
                 type(tok.t5).__name__, str(len(tok.t5)), str(len(tok.clip)), str(models.t5_max_length)]
        if self.s.model.weighted_captions:  # only then, so caches made before the flag existed stay valid
            parts.append("weighted_captions")
        return "|".join(parts)

    def cache_text_encoder_outputs(self) -> None:
        from library import caching

        session, models, data = self.session, self.session.models, self.session.data
        self.control.set_phase("caching_text", "encoding captions")
        models.clip_l.to(session.device)
        models.t5.to(session.device)
        if self.s.data.cache_text_encoder_outputs:
            def encode(captions: list[str]) -> dict:
                with torch.no_grad():
                    out = models.text_encoder.encode(captions)
                return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

            to_disk = self.s.data.cache_text_encoder_outputs_to_disk
            with self.main_process_first(to_disk, "waiting for the main process to cache text encoder outputs"):
                data.te_cache = caching.cache_text_encoder_outputs(
                    data.dataset, encode, to_disk=to_disk,
                    fingerprint=self.text_fingerprint(), apply_t5_attn_mask=self.s.model.apply_t5_attn_mask,
                    batch_size=self.s.data.text_encoder_batch_size or data.blueprints[0].batch_size,
                    io_timeout=self.s.guards.cache_io_timeout)
        data.dataset.set_caches(data.latent_cache, data.te_cache)
        self.encode_sample_prompts()
        if data.te_cache is not None:
            # T5 is never trained: once its outputs are cached it only costs memory.
            models.t5.to("cpu")
            models.text_encoder.t5_model = None
            models.t5 = None
            if not models.train_clip:
                models.clip_l.to("cpu")
            gc.collect()
        self.control.barrier()

    def encode_sample_prompts(self) -> None:
        if not self.s.sample.enabled:
            return
        from library import sampling

        samples = self.session.samples
        samples.prompts = sampling.parse_sample_prompts(self.s.sample.prompts)
        with torch.no_grad():
            for prompt in samples.prompts:
                for text in prompt.texts_to_encode():
                    if text not in samples.embeds:
                        print(f"cache Text Encoder outputs for prompt: {text}")
                        samples.embeds[text] = self.session.models.text_encoder.encode([text])

    def create_network(self) -> None:
        from networks import lora_flux

        net, models, device = self.s.network, self.session.models, self.session.device
        self.control.set_phase("loading", "creating the LoRA network")
        print(f"create LoRA network. base dim (rank): {net.dim}, alpha: {net.alpha}")
        clip = models.clip_l if models.train_clip else None
        continuation.merge_base_weights(session := self.session)
        network = lora_flux.create_network(1.0, net.dim, net.alpha, models.ae, [clip, None], models.transformer,
                                           neuron_dropout=self.s.regularisation.network_dropout, **net.args)
        # --network_train_text_encoder_only: the transformer modules are dropped (as upstream's apply_to), so the
        # file and the optimizer hold the CLIP-L LoRA only; the frozen transformer still carries the loss.
        network.apply_to([clip, None], models.transformer, apply_text_encoder=models.train_clip,
                         apply_unet=not net.train_text_encoder_only)
        if net.weights:
            # As upstream (strict=False): load what both sides have, say what was not matched.
            missing, extra = network.load_weights(net.weights, strict=False)
            print(f"loaded network weights from {net.weights}")
            if missing:
                log.warning("--network_weights: %d modules of this network are not in the file (they start "
                            "from their initial values), e.g. %s", len(missing), missing[0])
            if extra:
                log.warning("--network_weights: %d keys of the file are not in this network (ignored), e.g. %s",
                            len(extra), extra[0])
        if not self.s.run.blocks_to_swap:
            models.transformer.to(device)
        if models.train_clip:
            models.clip_l.to(device)
        self.setup_block_swap()  # with swapping, only the blocks that stay resident go to the device
        if self.s.run.gradient_checkpointing:
            models.transformer.enable_gradient_checkpointing()
            if models.train_clip:
                models.clip_l.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                models.clip_l.train()  # transformers checkpoints only in train mode; CLIP-L has no dropout
        network.to(device)
        precision.prepare_network(session, network)
        session.opt = Optimization(network=network, optimizer=None, lr_scheduler=None, trainable_params=[],
                                   optimizer_name="", base_metadata={},
                                   network_drops=regularisation.network_drops(network))

    def setup_block_swap(self) -> None:
        if not self.s.run.blocks_to_swap:
            return
        from library.offloading import BlockSwapper

        models = self.session.models
        print(f"enable block swap: blocks_to_swap={self.s.run.blocks_to_swap}")
        models.block_swapper = BlockSwapper(
            models.transformer, self.s.run.blocks_to_swap, self.session.device,
            timeout=self.s.guards.block_swap_timeout,
            on_timeout=lambda detail: self.control.guards.fire("block_swap", detail))
        models.block_swapper.move_to_device_except_swapped()
        if not self.s.run.gradient_checkpointing:
            log.warning("--blocks_to_swap saves little memory without --gradient_checkpointing: autograd keeps "
                        "each block's weights alive until backward")

    def create_optimizer(self) -> None:
        from library import fused_backward, optim

        print("prepare optimizer, data loader etc.")
        session, opt, data = self.session, self.s.optimizer, self.session.data
        network = session.opt.network
        groups = network.prepare_optimizer_params(opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
        optimizer = optim.create_optimizer(opt, groups)
        optimizer_name = optim.describe_optimizer(optimizer, opt)
        print(f"use {optimizer_name} optimizer | {opt.args}")
        lr_scheduler = optim.create_scheduler(opt, optimizer, data.max_train_steps, session.world)
        network, optimizer, lr_scheduler = session.accelerator.prepare(network, optimizer, lr_scheduler)
        trainable = [p for p in session.accelerator.unwrap_model(network).parameters() if p.requires_grad]
        fused = fused_backward.install(session, optimizer, trainable)  # None without --fused_backward_pass
        base_metadata = metadata.build_training_metadata(
            self.s, optimizer_name=optimizer_name, num_train_images=data.dataset.num_train_images,
            num_batches_per_epoch=data.batches_per_epoch, num_epochs=data.num_epochs,
            max_train_steps=data.max_train_steps, is_schnell=session.models.info.is_schnell,
            datasets=self.describe_datasets(), repo_dir=REPO_DIR, items=data.dataset.items,
            legacy_model_hash=session.models.hasher.legacy)
        session.opt = Optimization(network=network, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                   trainable_params=trainable, optimizer_name=optimizer_name,
                                   base_metadata=base_metadata, network_drops=session.opt.network_drops,
                                   fused=fused)

    def describe_datasets(self) -> list[dict]:
        result = []
        for bp in self.session.data.blueprints:
            result.append({"resolution": list(bp.resolution), "batch_size_per_device": bp.batch_size,
                           "enable_bucket": bp.enable_bucket,
                           "subsets": [{"image_dir": Path(sub.image_dir).name, "num_repeats": sub.num_repeats,
                                        "class_tokens": sub.class_tokens, **metadata.subset_options(sub)}
                                       for sub in bp.subsets]})
        return result

    def save_final(self) -> None:
        session = self.session
        with_state = self.s.save.save_state or self.s.save.save_state_on_train_end
        if with_state and session.is_main:
            print(console_markers.SAVING_LAST_STATE)
        self.checkpointer.save(kind="last", with_state=with_state)
        if session.models.block_swapper is not None:
            session.models.block_swapper.close()
        session.accelerator.end_training()
        if session.is_main:
            print(console_markers.MODEL_SAVED)
        sys.stdout.flush()
