"""The training loop: data cursor, one optimizer step, sampling and save cadence.

The data order is a pure function of (seed, epoch) and the noise/timesteps of step N are
drawn from a generator seeded with (seed, N). Together with the restored LoRA weights and
optimizer state, that is why a resumed run reproduces an uninterrupted one bit for bit
without replaying any data through the model.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import deque
from typing import Iterator

import torch
from tqdm import tqdm

from library.dataset import collate
from library import console_markers, image_augment, run_stats
from library.fault_injection import inject_point
from library.flow_matching import apply_prediction_type, flow_loss, huber_threshold, sample_noised, training_noise
from library import run_stop
from library.npz_io import CacheReadTimeout
from library.regularisation import scale_weight_norms, step_rng
from library.train_session import RunControl, TrainSession

log = logging.getLogger(__name__)
STEP_SEED_STRIDE = 1_000_003  # keeps per-step generator seeds of different runs apart
EXIT_AFTER_STEP_ENV = "FLUXTRAIN_EXIT_AFTER_STEP"
EXIT_AFTER_STEP_CODE = 75


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches from the trainer's position onward, epoch by epoch, for this process's shard."""

    def __init__(self, dataset, *, start_epoch: int, start_batch: int, num_epochs: int, rank: int, world: int,
                 batches_per_epoch: int):
        self.dataset, self.start_epoch, self.start_batch = dataset, start_epoch, start_batch
        self.num_epochs, self.rank, self.world = num_epochs, rank, world
        self.batches_per_epoch = batches_per_epoch

    def epoch_batches(self, epoch: int) -> list:
        batches = self.dataset.batches_for_epoch(epoch)
        shard = batches[self.rank::self.world]
        while len(shard) < self.batches_per_epoch:  # uneven split: repeat so every rank steps together
            shard.append(shard[len(shard) % max(1, len(shard))] if shard else batches[0])
        return shard

    def __iter__(self) -> Iterator[list]:
        for epoch in range(self.start_epoch, self.num_epochs):
            first = self.start_batch if epoch == self.start_epoch else 0
            yield from self.epoch_batches(epoch)[first:]

    def __len__(self) -> int:
        total = (self.num_epochs - self.start_epoch) * self.batches_per_epoch - self.start_batch
        return max(0, total)


def training_batches(session: TrainSession, control: RunControl) -> Iterator[dict]:
    """Batches from the session's position on, every wait bounded (iter() and each next())."""
    s = session.settings
    workers = min(s.data.num_workers, len(session.data.dataset.items), os.cpu_count() or 1)  # capped as upstream
    loader = make_loader(session, workers)
    bound = s.guards.dataloader_timeout
    # With workers the DataLoader's own timeout fires first and names the batch; this deadline is the
    # backstop. Without workers it is the only bound, so it uses the flag's value itself.
    # FIX: with 0 workers a stuck __getitem__ had no bound at all; this deadline is it.
    backstop = (bound + 10 if workers else bound) if bound else None
    # A cache read that timed out in a worker comes back as CacheReadTimeout (torch rebuilds the type).
    return control.guards.guard_iterator(loader, site="dataloader", seconds=backstop,
                                         map_errors=((CacheReadTimeout, "cache_io"),))


def make_loader(session: TrainSession, workers: int) -> torch.utils.data.DataLoader:
    s, data = session.settings, session.data
    sampler = ResumableBatchSampler(
        data.dataset, start_epoch=session.pos.epoch, start_batch=session.pos.batch_in_epoch,
        num_epochs=data.num_epochs, rank=session.rank, world=session.world,
        batches_per_epoch=data.batches_per_epoch)
    kwargs = {}
    if workers > 0:
        # FIX: a DataLoader worker that never answers used to block training forever with the GPU at 0 %;
        # the timeout turns it into an error naming the phase (see HangGuards "dataloader").
        kwargs["timeout"] = s.guards.dataloader_timeout or 0
        kwargs["persistent_workers"] = s.data.persistent_workers
    return torch.utils.data.DataLoader(
        data.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=session.device.type == "cuda", **kwargs)


def text_conditioning(session: TrainSession, batch: dict) -> dict:
    """T5 states and CLIP pooled vector for a batch: from the cache, or encoded now."""
    device, dtype, models = session.device, session.weight_dtype, session.models
    captions = batch["captions"]
    if "t5_out" in batch:
        cond = {k: batch[k] for k in ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")}
    else:
        with torch.no_grad():
            cond = models.text_encoder.encode(captions)
    if models.train_clip:
        tokens = models.text_encoder.tokenize(captions)
        cond["l_pooled"] = models.text_encoder.encode_clip(tokens["clip_ids"].to(device))
    return {k: v.to(device) if k == "t5_attn_mask" else v.to(device, dtype) for k, v in cond.items()}


def attention_mask(session: TrainSession, t5_mask: torch.Tensor, image_tokens: int) -> dict | None:
    if not session.settings.model.apply_t5_attn_mask:
        return None
    img = torch.ones(t5_mask.shape[0], image_tokens, dtype=torch.bool, device=t5_mask.device)
    mask = torch.cat([t5_mask.bool(), img], dim=1)[:, None, None, :]
    return {"attention_mask": mask}


def training_step(session: TrainSession, control: RunControl, batch: dict) -> float:
    inject_point("step", step=session.pos.step + 1, blocks_to_swap=session.settings.run.blocks_to_swap)
    s, device, dtype = session.settings, session.device, session.weight_dtype
    opt, accelerator = session.opt, session.accelerator
    step_seed = s.run.seed * STEP_SEED_STRIDE + session.pos.step + session.rank * 7919
    latents = image_augment.batch_latents(session, batch, step_seed)  # per-step augmentation: encoded here
    generator = torch.Generator().manual_seed(step_seed)
    noise = training_noise(latents.shape, s.flow, generator, latents).to(device, dtype)
    noised = sample_noised(latents, noise, s.flow, generator)
    # LoRA dropout masks come from a per-step seed, so a resumed run draws the same ones
    with step_rng(step_seed, device, enabled=opt.network_drops):
        loss = flow_matching_loss(session, batch, latents, noise, noised)
        accelerator.backward(loss)
    if opt.fused is not None:  # --fused_backward_pass: each tensor was clipped and stepped during backward
        opt.fused.end_step()
    else:
        sync_gradients(session, control)
        if s.optimizer.max_grad_norm:
            accelerator.clip_grad_norm_(opt.trainable_params, s.optimizer.max_grad_norm)
        opt.optimizer.step()
    opt.lr_scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    tracker = control.tracker
    control.bar_postfix = scale_weight_norms(  # upstream's "Keys Scaled" figures for the progress bar
        accelerator.unwrap_model(opt.network), s.regularisation.scale_weight_norms,
        log=lambda tags: tracker.log(tags, step=session.pos.step + 1, epoch=session.pos.epoch + 1) if tracker else None)
    return loss.detach().item()


def flow_matching_loss(session: TrainSession, batch: dict, latents: torch.Tensor, noise: torch.Tensor,
                       noised) -> torch.Tensor:
    """The transformer's loss on one noised batch (shared by training steps and validation passes)."""
    from library.flux_packing import image_ids, pack_latents, unpack_latents
    from library.precision import activation_offload

    s, device, dtype, models = session.settings, session.device, session.weight_dtype, session.models
    b, _, h, w = latents.shape
    cond = text_conditioning(session, batch)
    packed = pack_latents(noised.noisy)
    img_ids = image_ids(h, w, b, device, dtype)
    guidance = None
    # --bypass_flux_guidance: no guidance value, so the embedder is skipped (trainer.load_models set that up)
    if models.transformer.config.guidance_embeds and not s.flow.bypass_guidance:
        guidance = torch.full((b,), s.flow.guidance_scale, device=device, dtype=torch.float32)
    if models.block_swapper is not None:
        models.block_swapper.prepare_block_devices_before_forward()
    with session.accelerator.autocast(), activation_offload(session):
        pred = models.transformer(
            hidden_states=packed, encoder_hidden_states=cond["t5_out"], pooled_projections=cond["l_pooled"],
            timestep=(noised.timesteps / 1000).to(device, torch.float32), img_ids=img_ids, txt_ids=cond["txt_ids"][0],
            guidance=guidance, joint_attention_kwargs=attention_mask(session, cond["t5_attn_mask"], packed.shape[1]),
            return_dict=False)[0]
    pred = unpack_latents(pred.float(), h, w)
    pred, weighting = apply_prediction_type(pred, noised, s.flow)
    huber_c = (huber_threshold(s.flow, noised.timesteps) if s.flow.huber_schedule == "exponential"
               else s.flow.huber_c * s.flow.huber_scale)
    return flow_loss(pred, (noise - latents).float(), s.flow.loss_type, weighting, huber_c=huber_c,
                     mask=batch.get("alpha_masks"), sample_weights=batch.get("loss_weights"))


def sync_gradients(session: TrainSession, control: RunControl) -> None:
    """Average LoRA gradients across processes (the network's forward is never called, so DDP can't)."""
    if session.world == 1:
        return
    import torch.distributed as dist

    # FIX: a rank that never arrives used to hold the others in this collective for the backend's default
    # (10-30 min); --ddp_timeout bounds it on every backend, not only where the process-group timeout works.
    with control.ddp_deadline("gradient all-reduce: waiting for the other processes"):
        for param in session.opt.trainable_params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= session.world


def maybe_sample(session: TrainSession, control: RunControl, *, at_epoch_end: bool, first: bool = False) -> None:
    sample = session.settings.sample
    if not sample.enabled:
        return
    step = session.pos.step
    due = (first and sample.at_first) or (
        at_epoch_end and sample.every_n_epochs and session.pos.epoch % sample.every_n_epochs == 0) or (
        not at_epoch_end and not first and not sample.every_n_epochs and sample.every_n_steps
        and step % sample.every_n_steps == 0)
    if not due:
        return
    control.barrier()
    if session.is_main:
        generate_samples(session, control, epoch=session.pos.epoch if at_epoch_end else None)
    control.barrier()


def sample_conditioning(session: TrainSession, prompt: str) -> dict:
    """Cached T5 states for a sample prompt; when CLIP-L is trained, its pooled vector is encoded now so
    the sample shows the CLIP LoRA as it is at this step (as upstream, which re-encodes at sample time)."""
    models = session.models
    cond = dict(session.samples.embeds[prompt])
    if models.train_clip:
        tokens = models.text_encoder.tokenize([prompt])
        cond["l_pooled"] = models.text_encoder.encode_clip(tokens["clip_ids"].to(session.device))
    return cond


def generate_samples(session: TrainSession, control: RunControl, epoch: int | None = None) -> None:
    from library import sampling

    models, s, step = session.models, session.settings, session.pos.step
    previous = control.phase
    control.set_phase("sampling", f"sample images at step {step}")
    print(console_markers.GENERATING_SAMPLES.format(step=step))
    models.ae.to(session.device)

    def guard(index: int):
        # FIX: sampling runs inline and had no bound (minutes per image on small GPUs, forever when stuck).
        return control.guards.deadline("sample", s.guards.sample_timeout)

    swapper = models.block_swapper
    with torch.no_grad():
        sampling.generate_samples(
            transformer=models.transformer, ae=models.ae, encode_prompt=lambda p: sample_conditioning(session, p),
            prompts=session.samples.prompts, output_dir=s.save.output_dir, output_name=s.save.output_name,
            step=step, device=session.device, dtype=session.weight_dtype, is_schnell=models.info.is_schnell,
            per_image_guard=guard, network=session.accelerator.unwrap_model(session.opt.network),
            before_forward=swapper.prepare_block_devices_before_forward if swapper else None,
            apply_t5_attn_mask=s.model.apply_t5_attn_mask, epoch=epoch)
    models.ae.to("cpu")
    control.set_phase(previous)


def run_training_loop(session: TrainSession, checkpointer, control: RunControl) -> None:
    """Train from the session's position to the last step; `checkpointer` is a library.checkpointer.Checkpointer."""
    pos, data = session.pos, session.data
    if pos.step >= data.max_train_steps:
        print(f"already trained {pos.step} of {data.max_train_steps} steps: nothing left to do")
        return
    print_run_summary(session)
    control.set_phase("training", "training")
    control.heartbeat.set_totals(data.max_train_steps, data.num_epochs)
    maybe_sample(session, control, at_epoch_end=False, first=pos.step == 0)
    session.models.transformer.train()
    batches = training_batches(session, control)
    bar = tqdm(total=data.max_train_steps, initial=pos.step, desc=console_markers.STEPS_BAR_DESC, smoothing=0,
               file=sys.stderr, disable=not session.is_main)
    recent_losses: deque[float] = deque(maxlen=100)  # tqdm's avr_loss: mean of the last 100 steps
    clock = run_stats.StepClock.from_env()  # tools/gpu_check.py only; None otherwise
    current_epoch = None
    while pos.step < data.max_train_steps:
        if current_epoch != pos.epoch:
            current_epoch = pos.epoch
            if session.is_main:
                line = console_markers.EPOCH_LINE.format(epoch=pos.epoch + 1, total=data.num_epochs)
                print(f"\n{line}", flush=True)
        batch = next(batches, None)
        if batch is None:
            break
        loss = training_step(session, control, batch)
        pos.step += 1
        pos.batch_in_epoch += 1
        recent_losses.append(loss)
        bar.update(1)
        bar.set_postfix(**control.bar_postfix, avr_loss=sum(recent_losses) / len(recent_losses))
        control.record_loss(pos.step, loss)
        if control.tracker is not None:
            control.tracker.log_step(session, loss)
        control.heartbeat.step(pos.step, pos.epoch + 1, loss=loss)
        control.guards.progress()
        if clock is not None:
            clock.step_done()
        run_stop.check()  # a safe point: between steps, before any save of this step begins
        after_step(session, checkpointer, control)
        if pos.batch_in_epoch >= data.batches_per_epoch:
            end_epoch(session, checkpointer, control)
        simulate_crash_if_requested(pos.step)
    bar.close()
    if pos.batch_in_epoch:  # the run ended inside an epoch: upstream still closes that epoch's logs
        close_epoch_logs(session, control, epoch=pos.epoch + 1)
    if clock is not None and session.is_main:
        print(clock.report(session.device), flush=True)


def simulate_crash_if_requested(step: int) -> None:
    """Tests: `FLUXTRAIN_EXIT_AFTER_STEP=N` hard-exits after step N (and its saves), like a kill -9."""
    target = os.environ.get(EXIT_AFTER_STEP_ENV)
    if target and int(target) == step:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_AFTER_STEP_CODE)


def after_step(session: TrainSession, checkpointer, control: RunControl) -> None:
    save, pos = session.settings.save, session.pos
    maybe_sample(session, control, at_epoch_end=False)
    if control.validator is not None:
        control.validator.maybe_validate(session, control, at_epoch_end=False)
    if save.every_n_steps and pos.step % save.every_n_steps == 0:
        checkpointer.save(kind="step", with_state=save.save_state)


def end_epoch(session: TrainSession, checkpointer, control: RunControl) -> None:
    save, pos = session.settings.save, session.pos
    pos.epoch += 1
    pos.batch_in_epoch = 0
    control.barrier()
    close_epoch_logs(session, control)
    every = save.every_n_epochs
    if every and pos.epoch % every == 0 and pos.epoch < session.data.num_epochs:
        checkpointer.save(kind="epoch", with_state=save.save_state)
    maybe_sample(session, control, at_epoch_end=True)


def close_epoch_logs(session: TrainSession, control: RunControl, epoch: int | None = None) -> None:
    """The epoch's validation pass (if due) and its loss/epoch_average; `epoch` 1-based (default: just ended)."""
    if control.validator is not None:
        control.validator.maybe_validate(session, control, at_epoch_end=True, epoch=epoch)
    if control.tracker is not None:
        control.tracker.log_epoch_end(session, epoch=epoch)


def print_run_summary(session: TrainSession) -> None:
    if not session.is_main:
        return
    data = session.data
    print("running training")
    print(f"  num train images * repeats: {data.dataset.num_train_images}")
    print(f"  num batches per epoch: {data.batches_per_epoch}")
    print(f"  num epochs: {data.num_epochs}")
    print(f"  total optimization steps: {data.max_train_steps}")
    sys.stdout.flush()
