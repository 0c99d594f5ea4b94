"""Benchmark: our trainer's steady-state step time against a bare PyTorch loop, in one process.

    .venv/bin/python tools/benchmark.py [--width tiny|real] [--steps 20] [--rounds 3] [--json]

One trainer (same model, data, LoRA and optimizer) serves every variant. Prints the ratios measured in one run:
  ours / bare        the whole per-step path (data, guards, heartbeat, progress bar) vs forward+loss+backward+step
  hardened / plain   our loop with every hang guard on vs all of them off (target <= 1.02)
  logged / ours      our loop with TensorBoard logging (--logging_dir) vs without: the per-step logging cost
  fused / ours       our loop with --fused_backward_pass vs without
plus the time to load, augment and encode one batch (what --random_crop/--color_aug add per step), the
peak LoRA-gradient memory of one step with --fused_backward_pass vs without (fused / unfused), the
time of one validation pass (--validation_split 0.25: 2 held-out images x 4 timesteps), the startup
time to the first finished step and the peak RSS. Rounds interleave the variants so a machine that gets
busier affects all of them alike; medians are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

T_START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # entry script: the repository root, once; fluxgym._paths does the rest
    sys.path.insert(0, str(REPO))
from fluxgym._paths import use_sd_scripts  # noqa: E402

use_sd_scripts()
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_trainer(work: Path, width: str):
    from flux_train_network import setup_parser
    from fluxgym.tiny_flux import build_tiny_models
    from fluxgym.tiny_training import make_dataset, trainer_args
    from library.preflight import run_preflight
    from library.settings import settings_from_args
    from library.trainer import FluxLoRATrainer

    models = build_tiny_models(work / "models", seed=0, width=width)
    size = 64 if width == "tiny" else 128
    _, toml = make_dataset(work / ("data-" + width), count=8, size=size)
    ns = setup_parser().parse_args(trainer_args(models, toml, work / "out", "--max_train_steps", "100000",
                                                "--logging_dir", str(work / "logs"), "--validation_split", "0.25"))
    settings = settings_from_args(ns)
    trainer = FluxLoRATrainer(settings, run_preflight(settings))
    trainer.setup_accelerator()
    trainer.prepare_output_dir()
    for phase in (trainer.load_tokenizers, trainer.build_dataset, trainer.load_models, trainer.cache_latents,
                  trainer.cache_text_encoder_outputs, trainer.create_network, trainer.create_optimizer,
                  trainer.start_tracking):
        phase()
    tracker, validator = trainer.control.tracker, trainer.control.validator
    trainer.control.tracker = trainer.control.validator = None  # the plain variants log and validate nothing
    return trainer, tracker, validator


@contextlib.contextmanager
def logging_on(trainer, tracker):
    """The same trainer with its TensorBoard tracker logging every step (validation still off)."""
    trainer.control.tracker = tracker
    try:
        yield trainer
    finally:
        trainer.control.tracker = None


def time_log_step(trainer, tracker, calls: int = 500) -> float:
    """Seconds per tracker.log_step (the per-step TensorBoard write: loss, average, 2 learning rates): the cost
    logging adds to a step, measured directly so it is not lost in step-time noise on a busy machine."""
    started = time.perf_counter()
    for _ in range(calls):
        tracker.log_step(trainer.session, 0.5)
    return (time.perf_counter() - started) / calls


def time_validation(trainer, validator, passes: int) -> float:
    """Seconds per validation pass (forward only, fixed noise, 4 timesteps per held-out batch)."""
    started = time.perf_counter()
    for _ in range(passes):
        validator.results.clear()
        validator.run(trainer.session)
    return (time.perf_counter() - started) / passes


@contextlib.contextmanager
def guards_off(trainer):
    """The same trainer (same model, data, LoRA, optimizer) with every hang guard off: all timeouts 0,
    no stall dump, no heartbeat writes. Restored on exit."""
    from dataclasses import replace

    from library.hang_guards import HangGuards
    from library.train_session import SilentHeartbeat

    session, control = trainer.session, trainer.control
    saved = session.settings, control.guards, control.heartbeat
    off = replace(session.settings.guards, dataloader_timeout=0, cache_io_timeout=0, save_timeout=0,
                  sample_timeout=0, stall_dump_timeout=0)
    session.settings = replace(session.settings, guards=off)
    control.heartbeat = SilentHeartbeat()
    control.guards = HangGuards(session.settings.save.output_dir, None, stall_dump_timeout=0)
    try:
        yield trainer
    finally:
        control.guards.close()
        session.settings, control.guards, control.heartbeat = saved


def time_ours(trainer, steps: int) -> float:
    """Seconds per step of the real loop (run_training_loop) for `steps` more steps."""
    from library.train_loop import run_training_loop

    session = trainer.session
    session.data.max_train_steps = session.pos.step + steps
    session.data.num_epochs = 10**6
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        started = time.perf_counter()
        run_training_loop(session, trainer.checkpointer, trainer.control)
        return (time.perf_counter() - started) / steps


def time_bare(trainer, steps: int) -> float:
    """Seconds per step of forward, loss, backward and optimizer step on pre-collated batches."""
    import torch

    from library.dataset import collate
    from library.flux_packing import image_ids, pack_latents, unpack_latents

    session = trainer.session
    ds, models = session.data.dataset, session.models
    batches = [collate([ds[key] for key in batch]) for batch in ds.batches_for_epoch(0)]
    model, opt, sched = models.transformer, session.opt.optimizer, session.opt.lr_scheduler
    dtype = session.weight_dtype
    started = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        latents = batch["latents"].to(dtype)
        b, _, h, w = latents.shape
        gen = torch.Generator().manual_seed(i)
        noise = torch.randn(latents.shape, generator=gen).to(dtype)
        sigma = torch.rand(b, generator=gen).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        l_pooled = batch["l_pooled"].to(dtype)
        if models.train_clip:
            tokens = models.text_encoder.tokenize(batch["captions"])
            l_pooled = models.text_encoder.encode_clip(tokens["clip_ids"])
        pred = model(hidden_states=pack_latents(noisy), encoder_hidden_states=batch["t5_out"].to(dtype),
                     pooled_projections=l_pooled, timestep=sigma.view(-1), img_ids=image_ids(h, w, b),
                     txt_ids=batch["txt_ids"][0], guidance=torch.full((b,), 1.0) if model.config.guidance_embeds
                     else None, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(unpack_latents(pred.float(), h, w), (noise - latents).float())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def time_live_encode(trainer, passes: int) -> float:
    """Seconds to load, augment and encode one batch with the autoencoder: what --random_crop/--color_aug
    (no latent cache) add to every training step (library.image_augment)."""
    import numpy as np
    import torch

    from library import image_augment
    from library.flux_loading import encode_latents

    session = trainer.session
    ds, ae = session.data.dataset, session.models.ae
    items = [ds.items[item] for _, item, _ in ds.batches_for_epoch(0)[0]]
    started = time.perf_counter()
    for i in range(passes):
        rng = np.random.default_rng(i)
        images = torch.stack([image_augment.load_augmented(item, rng=rng, flip=False)[0] for item in items])
        with torch.no_grad():
            encode_latents(ae, images.to(session.device, ae.dtype), torch.Generator().manual_seed(i))
    return (time.perf_counter() - started) / passes


@contextlib.contextmanager
def fused_on(trainer):
    """The same trainer with --fused_backward_pass hooks (max_grad_norm as configured); removed on exit."""
    from library.fused_backward import FusedBackward

    opt = trainer.session.opt
    opt.fused = FusedBackward(opt.optimizer, opt.trainable_params,
                              max_grad_norm=trainer.session.settings.optimizer.max_grad_norm)
    try:
        yield trainer
    finally:
        opt.fused.remove()
        opt.fused = None


def peak_grad_bytes(trainer, fused: bool) -> int:
    """Peak bytes of LoRA gradients alive at once during one real training step, ordinary or with
    --fused_backward_pass (library.fused_backward frees each one right after its own step)."""
    from library.dataset import collate
    from library.fused_backward import FusedBackward
    from library.train_loop import training_step

    session = trainer.session
    opt, ds = session.opt, session.data.dataset
    peak = [0]

    def probe(_param):
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in opt.trainable_params if p.grad is not None))

    # registered before the fused hooks, so each probe runs while its own gradient still exists
    handles = [p.register_post_accumulate_grad_hook(probe) for p in opt.trainable_params]
    if fused:
        opt.fused = FusedBackward(opt.optimizer, opt.trainable_params, max_grad_norm=0.0)
    try:
        training_step(session, trainer.control, collate([ds[key] for key in ds.batches_for_epoch(0)[0]]))
    finally:
        for handle in handles:
            handle.remove()
        if opt.fused is not None:
            opt.fused.remove()
            opt.fused = None
    return peak[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="fluxtrain-bench-") as tmp:
        work = Path(tmp)
        trainer, tracker, validator = build_trainer(work, args.width)
        time_ours(trainer, 1)
        startup = time.monotonic() - T_START
        time_bare(trainer, 2)  # warm-up
        grad_bytes = {"unfused": peak_grad_bytes(trainer, False), "fused": peak_grad_bytes(trainer, True)}
        results = {"bare": [], "ours": [], "plain": [], "logged": [], "fused": [], "validation_pass": [],
                   "log_call": [], "live_encode": []}
        contexts = {"ours": contextlib.nullcontext, "plain": lambda: guards_off(trainer),
                    "logged": lambda: logging_on(trainer, tracker), "fused": lambda: fused_on(trainer)}
        for round_no in range(args.rounds):
            results["bare"].append(time_bare(trainer, args.steps))
            # Whichever loop variant runs first in a round measured 1-3 % slower here, so the order rotates.
            shift = round_no % len(contexts)
            order = list(contexts)[shift:] + list(contexts)[:shift]
            for variant in order:
                with contexts[variant]():
                    results[variant].append(time_ours(trainer, args.steps))
            results["validation_pass"].append(time_validation(trainer, validator, 2))
            results["log_call"].append(time_log_step(trainer, tracker))
            results["live_encode"].append(time_live_encode(trainer, 4))
        tracker.close()
        trainer.control.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "width": args.width, "steps_per_round": args.steps, "rounds": args.rounds,
        "bare_step_s": med["bare"], "ours_step_s": med["ours"], "ours_without_hardening_step_s": med["plain"],
        "ratio_ours_vs_bare": med["ours"] / med["bare"], "ratio_hardened_vs_plain": med["ours"] / med["plain"],
        "logged_step_s": med["logged"], "logging_cost_per_step_s": med["logged"] - med["ours"],
        "log_step_call_s": med["log_call"], "validation_pass_s": med["validation_pass"],
        "validation_pass_in_steps": med["validation_pass"] / med["ours"],
        "validation_batches_per_pass": len(validator.batches),
        "startup_to_first_step_s": startup,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fused_step_s": med["fused"], "ratio_fused_vs_ours": med["fused"] / med["ours"],
        "peak_grad_bytes_unfused": grad_bytes["unfused"], "peak_grad_bytes_fused": grad_bytes["fused"],
        "ratio_grad_memory_fused_vs_unfused": grad_bytes["fused"] / grad_bytes["unfused"],
        "live_encode_batch_s": med["live_encode"], "live_encode_in_steps": med["live_encode"] / med["ours"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model width {args.width}; {args.rounds} rounds x {args.steps} steps per variant (medians)")
        print(f"  bare PyTorch loop      {med['bare'] * 1000:8.2f} ms/step")
        print(f"  ours, hardened         {med['ours'] * 1000:8.2f} ms/step   ratio vs bare "
              f"{report['ratio_ours_vs_bare']:.3f} (target <= 1.10)")
        print(f"  ours, guards off       {med['plain'] * 1000:8.2f} ms/step   hardened/plain "
              f"{report['ratio_hardened_vs_plain']:.3f} (target <= 1.02)")
        print(f"  ours, TensorBoard on   {med['logged'] * 1000:8.2f} ms/step   logging cost "
              f"{report['logging_cost_per_step_s'] * 1000:+.2f} ms/step (loop difference); one log_step call "
              f"{med['log_call'] * 1e6:.0f} us")
        print(f"  ours, fused backward   {med['fused'] * 1000:8.2f} ms/step   fused/ours "
              f"{report['ratio_fused_vs_ours']:.3f} (one optimizer call per LoRA tensor)")
        print(f"  one validation pass    {med['validation_pass'] * 1000:8.2f} ms   "
              f"= {report['validation_pass_in_steps']:.2f} training steps ({report['validation_batches_per_pass']} "
              "batches x 4 timesteps; validating every N steps adds pass/N per step)")
        print(f"  per-step image encode  {med['live_encode'] * 1000:8.2f} ms   "
              f"= {report['live_encode_in_steps']:.2f} training steps (load, augment, autoencoder: what "
              "--random_crop/--color_aug add to each step)")
        print(f"  startup to first step  {startup:8.2f} s")
        print(f"  peak RSS               {report['peak_rss_mb']:8.0f} MB")
        print(f"  peak LoRA gradients    {grad_bytes['unfused'] / 1024:8.1f} KiB ordinary, "
              f"{grad_bytes['fused'] / 1024:.1f} KiB with --fused_backward_pass (ratio "
              f"{report['ratio_grad_memory_fused_vs_unfused']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
