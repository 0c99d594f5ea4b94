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
from library.fault_injection import inject_point
from library.flow_matching import apply_prediction_type, flow_loss, huber_threshold, sample_noised, training_noise
from library.hang_guards import HINTS
from library.regularisation import scale_weight_norms, step_rng

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


def training_batches(trainer) -> Iterator[dict]:
    """Batches from the trainer's position on, every wait bounded (iter() and each next())."""
    s = trainer.s
    workers = min(s.data.num_workers, len(trainer.dataset.items), os.cpu_count() or 1)  # capped as upstream
    loader = make_loader(trainer, workers)
    bound = s.guards.dataloader_timeout
    # With workers the DataLoader's own timeout fires first and names the batch; this deadline is the
    # backstop. Without workers it is the only bound, so it uses the flag's value itself.
    # FIX: with 0 workers a stuck __getitem__ had no bound at all; this deadline is it.
    backstop = (bound + 10 if workers else bound) if bound else None
    return trainer.guards.guard_iterator(loader, site="dataloader", seconds=backstop)


def make_loader(trainer, workers: int) -> torch.utils.data.DataLoader:
    s = trainer.s
    sampler = ResumableBatchSampler(
        trainer.dataset, start_epoch=trainer.pos.epoch, start_batch=trainer.pos.batch_in_epoch,
        num_epochs=trainer.num_epochs, rank=trainer.accelerator.process_index,
        world=trainer.accelerator.num_processes, batches_per_epoch=trainer.batches_per_epoch)
    kwargs = {}
    if workers > 0:
        # FIX: a DataLoader worker that never answers used to block training forever with the GPU at 0 %;
        # the timeout turns it into an error naming the phase (see HangGuards "dataloader").
        kwargs["timeout"] = s.guards.dataloader_timeout or 0
        kwargs["persistent_workers"] = s.data.persistent_workers
    return torch.utils.data.DataLoader(
        trainer.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=trainer.device.type == "cuda", **kwargs)


def text_conditioning(trainer, batch: dict) -> dict:
    """T5 states and CLIP pooled vector for a batch: from the cache, or encoded now."""
    device, dtype = trainer.device, trainer.weight_dtype
    captions = batch["captions"]
    if "t5_out" in batch:
        cond = {k: batch[k] for k in ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")}
    else:
        with torch.no_grad():
            cond = trainer.text_encoder.encode(captions)
    if trainer.train_clip:
        tokens = trainer.text_encoder.tokenize(captions)
        cond["l_pooled"] = trainer.text_encoder.encode_clip(tokens["clip_ids"].to(device))
    return {k: v.to(device) if k == "t5_attn_mask" else v.to(device, dtype) for k, v in cond.items()}


def attention_mask(trainer, t5_mask: torch.Tensor, image_tokens: int) -> dict | None:
    if not trainer.s.model.apply_t5_attn_mask:
        return None
    img = torch.ones(t5_mask.shape[0], image_tokens, dtype=torch.bool, device=t5_mask.device)
    mask = torch.cat([t5_mask.bool(), img], dim=1)[:, None, None, :]
    return {"attention_mask": mask}


def training_step(trainer, batch: dict) -> float:
    inject_point("step")
    s, device, dtype = trainer.s, trainer.device, trainer.weight_dtype
    latents = batch["latents"].to(device, dtype)
    step_seed = s.run.seed * STEP_SEED_STRIDE + trainer.pos.step + trainer.accelerator.process_index * 7919
    generator = torch.Generator().manual_seed(step_seed)
    noise = training_noise(latents.shape, s.flow, generator).to(device, dtype)
    noised = sample_noised(latents, noise, s.flow, generator)
    # LoRA dropout masks come from a per-step seed, so a resumed run draws the same ones
    with step_rng(step_seed, device, enabled=getattr(trainer, "network_drops", False)):
        loss = flow_matching_loss(trainer, batch, latents, noise, noised)
        trainer.accelerator.backward(loss)
    sync_gradients(trainer)
    if s.optimizer.max_grad_norm:
        trainer.accelerator.clip_grad_norm_(trainer.trainable_params, s.optimizer.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.norm_postfix = scale_weight_norms(  # upstream's "Keys Scaled" figures for the progress bar
        trainer.accelerator.unwrap_model(trainer.network), s.regularisation.scale_weight_norms,
        log=lambda tags: trainer.tracker.log(tags, step=trainer.pos.step + 1, epoch=trainer.pos.epoch + 1))
    return loss.detach().item()


def flow_matching_loss(trainer, batch: dict, latents: torch.Tensor, noise: torch.Tensor, noised) -> torch.Tensor:
    """The transformer's loss on one noised batch (shared by training steps and validation passes)."""
    from library.flux_packing import image_ids, pack_latents, unpack_latents
    from library.precision import activation_offload

    s, device, dtype = trainer.s, trainer.device, trainer.weight_dtype
    b, _, h, w = latents.shape
    cond = text_conditioning(trainer, batch)
    packed = pack_latents(noised.noisy)
    img_ids = image_ids(h, w, b, device, dtype)
    guidance = None
    if trainer.transformer.config.guidance_embeds:
        guidance = torch.full((b,), s.flow.guidance_scale, device=device, dtype=torch.float32)
    if trainer.block_swapper is not None:
        trainer.block_swapper.prepare_block_devices_before_forward()
    with trainer.accelerator.autocast(), activation_offload(trainer):
        pred = trainer.transformer(
            hidden_states=packed, encoder_hidden_states=cond["t5_out"], pooled_projections=cond["l_pooled"],
            timestep=(noised.timesteps / 1000).to(device, dtype), img_ids=img_ids, txt_ids=cond["txt_ids"][0],
            guidance=guidance, joint_attention_kwargs=attention_mask(trainer, cond["t5_attn_mask"], packed.shape[1]),
            return_dict=False)[0]
    pred = unpack_latents(pred.float(), h, w)
    pred, weighting = apply_prediction_type(pred, noised, s.flow)
    huber_c = (huber_threshold(s.flow, noised.timesteps) if s.flow.huber_schedule == "exponential"
               else s.flow.huber_c * s.flow.huber_scale)
    return flow_loss(pred, (noise - latents).float(), s.flow.loss_type, weighting, huber_c=huber_c,
                     mask=batch.get("alpha_masks"), sample_weights=batch.get("loss_weights"))


def sync_gradients(trainer) -> None:
    """Average LoRA gradients across processes (the network's forward is never called, so DDP can't)."""
    if trainer.accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    minutes = trainer.s.guards.ddp_timeout_minutes
    # FIX: a rank that never arrives used to hold the others in this collective for the backend's default
    # (10-30 min); --ddp_timeout bounds it on every backend, not only where the process-group timeout works.
    with trainer.guards.deadline("ddp", minutes * 60 if minutes else None, hint=HINTS["ddp"],
                                 detail="gradient all-reduce: waiting for the other processes"):
        for param in trainer.trainable_params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= trainer.accelerator.num_processes


def maybe_sample(trainer, *, at_epoch_end: bool, first: bool = False) -> None:
    sample = trainer.s.sample
    if not sample.enabled:
        return
    step = trainer.pos.step
    due = (first and sample.at_first) or (
        at_epoch_end and sample.every_n_epochs and trainer.pos.epoch % sample.every_n_epochs == 0) or (
        not at_epoch_end and not first and not sample.every_n_epochs and sample.every_n_steps
        and step % sample.every_n_steps == 0)
    if not due:
        return
    trainer.barrier()
    if trainer.accelerator.is_main_process:
        generate_samples(trainer, epoch=trainer.pos.epoch if at_epoch_end else None)
    trainer.barrier()


def sample_conditioning(trainer, prompt: str) -> dict:
    """Cached T5 states for a sample prompt; when CLIP-L is trained, its pooled vector is encoded now so
    the sample shows the CLIP LoRA as it is at this step (as upstream, which re-encodes at sample time)."""
    cond = dict(trainer.sample_embeds[prompt])
    if trainer.train_clip:
        tokens = trainer.text_encoder.tokenize([prompt])
        cond["l_pooled"] = trainer.text_encoder.encode_clip(tokens["clip_ids"].to(trainer.device))
    return cond


def generate_samples(trainer, epoch: int | None = None) -> None:
    from library import sampling

    previous = trainer.phase
    trainer.set_phase("sampling", f"sample images at step {trainer.pos.step}")
    print(f"generating sample images at step: {trainer.pos.step}")
    trainer.ae.to(trainer.device)

    def guard(index: int):
        # FIX: sampling runs inline and had no bound (minutes per image on small GPUs, forever when stuck).
        return trainer.guards.deadline("sample", trainer.s.guards.sample_timeout, hint=HINTS["sample"])

    with torch.no_grad():
        sampling.generate_samples(
            transformer=trainer.transformer, ae=trainer.ae, encode_prompt=lambda p: sample_conditioning(trainer, p),
            prompts=trainer.sample_prompts, output_dir=trainer.s.save.output_dir,
            output_name=trainer.s.save.output_name, step=trainer.pos.step, device=trainer.device,
            dtype=trainer.weight_dtype, is_schnell=trainer.model_info.is_schnell, per_image_guard=guard,
            network=trainer.accelerator.unwrap_model(trainer.network),
            before_forward=trainer.block_swapper.prepare_block_devices_before_forward if trainer.block_swapper else None,
            apply_t5_attn_mask=trainer.s.model.apply_t5_attn_mask, epoch=epoch)
    trainer.ae.to("cpu")
    trainer.set_phase(previous)


def run_training_loop(trainer) -> None:
    s, pos = trainer.s, trainer.pos
    if pos.step >= trainer.max_train_steps:
        print(f"already trained {pos.step} of {trainer.max_train_steps} steps: nothing left to do")
        return
    print_run_summary(trainer)
    trainer.set_phase("training", "training")
    trainer.heartbeat.set_totals(trainer.max_train_steps, trainer.num_epochs)
    maybe_sample(trainer, at_epoch_end=False, first=pos.step == 0)
    trainer.transformer.train()
    batches = training_batches(trainer)
    bar = tqdm(total=trainer.max_train_steps, initial=pos.step, desc="steps", smoothing=0, file=sys.stderr,
               disable=not trainer.accelerator.is_main_process)
    recent_losses: deque[float] = deque(maxlen=100)  # tqdm's avr_loss: mean of the last 100 steps
    current_epoch = None
    while pos.step < trainer.max_train_steps:
        if current_epoch != pos.epoch:
            current_epoch = pos.epoch
            if trainer.is_main:
                print(f"\nepoch {pos.epoch + 1}/{trainer.num_epochs}", flush=True)
        batch = next(batches, None)
        if batch is None:
            break
        loss = training_step(trainer, batch)
        pos.step += 1
        pos.batch_in_epoch += 1
        recent_losses.append(loss)
        bar.update(1)
        bar.set_postfix(**getattr(trainer, "norm_postfix", {}), avr_loss=sum(recent_losses) / len(recent_losses))
        trainer.record_loss(loss)
        trainer.heartbeat.step(pos.step, pos.epoch + 1)
        trainer.guards.progress()
        after_step(trainer)
        if pos.batch_in_epoch >= trainer.batches_per_epoch:
            end_epoch(trainer)
        simulate_crash_if_requested(pos.step)
    bar.close()
    if pos.batch_in_epoch:  # the run ended inside an epoch: upstream still closes that epoch's logs
        trainer.validator.maybe_validate(trainer, at_epoch_end=True, epoch=pos.epoch + 1)
        trainer.tracker.log_epoch_end(trainer, epoch=pos.epoch + 1)


def simulate_crash_if_requested(step: int) -> None:
    """Tests: `FLUXTRAIN_EXIT_AFTER_STEP=N` hard-exits after step N (and its saves), like a kill -9."""
    target = os.environ.get(EXIT_AFTER_STEP_ENV)
    if target and int(target) == step:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_AFTER_STEP_CODE)


def after_step(trainer) -> None:
    s, pos = trainer.s, trainer.pos
    maybe_sample(trainer, at_epoch_end=False)
    trainer.validator.maybe_validate(trainer, at_epoch_end=False)
    if s.save.every_n_steps and pos.step % s.save.every_n_steps == 0:
        trainer.save_checkpoint(kind="step", with_state=s.save.save_state)


def end_epoch(trainer) -> None:
    s, pos = trainer.s, trainer.pos
    pos.epoch += 1
    pos.batch_in_epoch = 0
    trainer.barrier()
    trainer.validator.maybe_validate(trainer, at_epoch_end=True)
    trainer.tracker.log_epoch_end(trainer)
    every = s.save.every_n_epochs
    if every and pos.epoch % every == 0 and pos.epoch < trainer.num_epochs:
        trainer.save_checkpoint(kind="epoch", with_state=s.save.save_state)
    maybe_sample(trainer, at_epoch_end=True)


def print_run_summary(trainer) -> None:
    if not trainer.is_main:
        return
    print("running training")
    print(f"  num train images * repeats: {trainer.dataset.num_train_images}")
    print(f"  num batches per epoch: {trainer.batches_per_epoch}")
    print(f"  num epochs: {trainer.num_epochs}")
    print(f"  total optimization steps: {trainer.max_train_steps}")
    sys.stdout.flush()
