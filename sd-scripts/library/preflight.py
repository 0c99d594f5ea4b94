"""Every check that needs no model weights, run once right after the settings are built.

`run_preflight` fails fast (seconds, not after minutes of loading and caching) with an error naming the flag
or file and what to do, then settles what the rest of the run only reads:
  1. numeric ranges (`--network_dim >= 1`, `--learning_rate > 0`, counts >= 1, cadences >= 0, bounds >= 0);
  2. input files: each model file exists, is readable and is a complete safetensors file (header and size only;
     a diffusers folder needs its config.json), `--network_weights`, the dataset config and its image folders;
  3. on the main process, the output-folder lock (library.output_lock; held until the run ends); the output
     folder writable (a probe file is created and removed) with room for one more checkpoint;
  4. on the main process: unfinished saves of a killed run are settled;
  5. the resume target: resolved (`auto`: the newest valid state of the run being continued), validated once
     and its settings compared with this run's;
  6. on the main process: the run identity (library.run_identity), moving other runs' files to runs/<id>/.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import shutil
import socket
from pathlib import Path

from library import atomic_io, checkpoint_io, checkpoint_validation, run_identity
from library.errors import BadFileError, BadFlagError, DiskError, ResumeError
from library.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Preflight:
    """What the preflight settled; the trainer builds its session from it and never re-decides it."""

    rank: int
    world: int
    blueprints: list
    resume: checkpoint_io.ResumeInfo | None
    run: run_identity.RunIdentity | None  # None on other processes until the main one has recorded it
    messages: list[str]
    lock: object | None = None  # the output-folder lock (output_lock.OutputLock), held for the whole run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def process_rank() -> tuple[int, int]:
    """(global rank, world size) from the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def run_preflight(settings: TrainSettings, *, command: list[str] | None = None) -> Preflight:
    """Raise a UserError (see library.errors) for the first problem found; the caller releases `lock`."""
    from library.output_lock import acquire_output_lock

    rank, world = process_rank()
    check_numbers(settings.raw)
    check_model_files(settings)
    blueprints = load_blueprints(settings)
    # FIX: two trainers (say `fluxgym train X` and `bash outputs/x/train.sh`) wrote the same files side by side.
    lock = acquire_output_lock(settings.save.output_dir, command=command or []) if rank == 0 else None
    try:
        check_output_dir(settings)
        run = None
        if rank == 0:
            settle_unfinished_saves(settings.save.output_dir)
        resume, messages = resolve_resume(settings)
        if resume is None:
            check_weights_stay(settings)
        if rank == 0:  # other processes read it once the process group exists (library.rank_agreement)
            run, lines = run_identity.begin_run(settings.save.output_dir, settings.save.output_name,
                                                settings.args_digest(), resume_from=_as_checkpoint(resume))
            messages += lines
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Preflight(rank, world, blueprints, resume, run, messages, lock)


# ---------------------------------------------------------------- 1. numbers

# (flag, smallest allowed value, whether the smallest value itself is allowed, what the flag is / what to use)
RANGES = (
    ("network_dim", 1, True, "the LoRA rank; 4 to 32 is usual"),
    ("learning_rate", 0, False, "e.g. 1e-4; FluxGym's default is 8e-4"),
    ("unet_lr", 0, True, "leave it out to use --learning_rate"),
    ("max_train_steps", 1, True, "the number of optimizer steps, or use --max_train_epochs"),
    ("max_train_epochs", 1, True, "the number of epochs"),
    ("train_batch_size", 1, True, "images per step"),
    ("save_every_n_epochs", 0, True, "0 or leave it out to save only at the end"),
    ("save_every_n_steps", 0, True, "0 or leave it out to save only at the end"),
    ("save_last_n_epochs", 0, True, "how many epoch checkpoints to keep"),
    ("save_last_n_epochs_state", 0, True, "how many epoch state folders to keep"),
    ("save_last_n_steps", 0, True, "keep step checkpoints within this many steps"),
    ("save_last_n_steps_state", 0, True, "keep step state folders within this many steps"),
    ("sample_every_n_steps", 0, True, "0 or leave it out for no samples"),
    ("sample_every_n_epochs", 0, True, "0 or leave it out for no samples"),
    ("max_data_loader_n_workers", 0, True, "0 loads in the main process"),
    ("vae_batch_size", 0, True, "images per autoencoder batch while caching"),
    ("lr_warmup_steps", 0, True, "steps, or a ratio of the total steps"),
    ("lr_scheduler_num_cycles", 1, True, "cycles of cosine_with_restarts"),
    ("dataloader_timeout", 0, True, "seconds; 0 turns the bound off"),
    ("block_swap_timeout", 0, True, "seconds; 0 turns the bound off"),
    ("cache_io_timeout", 0, True, "seconds; 0 turns the bound off"),
    ("sample_timeout", 0, True, "seconds; 0 turns the bound off"),
    ("save_timeout", 0, True, "seconds; 0 turns the bound off"),
    ("stall_dump_timeout", 0, True, "seconds; 0 turns the dump off"),
    ("ddp_timeout", 0, True, "minutes; leave it out for the backend's default"),
)


def check_numbers(raw: dict) -> None:
    for flag, low, inclusive, what in RANGES:
        value = raw.get(flag)
        if value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not isinstance(v, (int, float)):
                continue
            ok = v >= low if inclusive else v > low
            if not ok:
                need = f"{'at least' if inclusive else 'more than'} {low}"
                raise BadFlagError(f"--{flag} {v}: must be {need} ({what})")  # `what` says what to use
    for v in raw.get("text_encoder_lr") or []:
        if v < 0:
            raise BadFlagError(f"--text_encoder_lr {v}: must be 0 or more (0 freezes CLIP-L)")


# ---------------------------------------------------------------- 2. input files

MODEL_FLAGS = (  # settings attribute, flag, what, diffusers subfolder
    ("dit_path", "--pretrained_model_name_or_path", "FLUX transformer", "transformer"),
    ("clip_l_path", "--clip_l", "CLIP-L text encoder", "text_encoder"),
    ("t5xxl_path", "--t5xxl", "T5-XXL text encoder", "text_encoder_2"),
    ("ae_path", "--ae", "autoencoder", "vae"),
)


def check_model_files(settings: TrainSettings) -> None:
    for attr, flag, what, sub in MODEL_FLAGS:
        check_weights(getattr(settings.model, attr), flag, what, sub)
    if settings.network.weights:
        check_weights(settings.network.weights, "--network_weights", "LoRA weights", None)
    cache = settings.model.tokenizer_cache_dir
    if cache and not Path(cache).is_dir():
        raise BadFileError(f"--tokenizer_cache_dir {cache}: folder not found (it holds "
                           "openai_clip-vit-large-patch14/ and google_t5-v1_1-xxl/)")


def check_weights(path: str, flag: str, what: str, subfolder: str | None) -> list[Path]:
    """The weight files behind a flag, each checked from its header: exists, readable, complete safetensors."""
    from library.flux_loading import weight_files

    p = Path(path)
    if p.is_dir():
        _check_diffusers_folder(p, flag, what, subfolder)
    elif p.exists() and not os.access(p, os.R_OK):
        raise BadFileError(f"{flag}: {what} file {p} is not readable (check its permissions)")
    files = weight_files(path, flag, what, (subfolder,) if subfolder else ())
    for f in files:
        try:
            checkpoint_validation.read_safetensors_header(f)
        except ValueError as exc:
            raise BadFileError(f"{flag}: {what} file {f} is not a complete safetensors file ({exc}); "
                               "re-download it or point the flag at the right file") from None
        except OSError as exc:
            raise BadFileError(f"{flag}: cannot read {what} file {f} ({exc.strerror or exc})") from None
    return files


def _check_diffusers_folder(folder: Path, flag: str, what: str, subfolder: str | None) -> None:
    where = folder / subfolder if subfolder and (folder / subfolder).is_dir() else folder
    if not (where / "config.json").is_file():
        raise BadFileError(f"{flag}: {folder} is a folder but not a diffusers model folder ({where / 'config.json'} "
                           f"is missing); pass the {what} .safetensors file, or a complete diffusers folder")


def load_blueprints(settings: TrainSettings) -> list:
    """The dataset config parsed and checked (image folders exist and hold images); the trainer builds from it."""
    from library import dataset_config, image_augment

    data = settings.data
    if data.dataset_class:  # the user's class lists the items (library.dataset_class); it gets the parsed flags
        from library.dataset_class import blueprints_from_dataset_class

        blueprints = blueprints_from_dataset_class(data.dataset_class, argparse.Namespace(**settings.raw),
                                                   cli=data.cli_fallbacks)
    elif data.dataset_config:
        if not Path(data.dataset_config).is_file():
            raise BadFileError(f"--dataset_config {data.dataset_config}: file not found")
        for flag, value in (("--train_data_dir", data.train_data_dir), ("--reg_data_dir", data.reg_data_dir),
                            ("--in_json", data.in_json)):
            if value:  # as upstream: the config file describes every folder
                log.warning("--dataset_config is set: %s is ignored (use is_reg = true in a subset)", flag)
        blueprints = dataset_config.load_dataset_config(data.dataset_config, cli=data.cli_fallbacks)
    else:
        if not Path(data.train_data_dir).is_dir():
            raise BadFileError(f"--train_data_dir {data.train_data_dir}: folder not found")
        blueprints = dataset_config.blueprints_from_train_data_dir(data.train_data_dir, cli=data.cli_fallbacks,
                                                                   reg_data_dir=data.reg_data_dir,
                                                                   in_json=data.in_json)
    dataset_config.check_text_encoder_cache(blueprints, data)
    dataset_config.check_masked_loss(blueprints, settings.regularisation.masked_loss)
    image_augment.check_latent_cache(blueprints, cache_flag=data.latent_cache_flag)
    return blueprints


# ---------------------------------------------------------------- 3. output folder

PROBE_NAME = ".fluxtrain-write-probe"


def check_output_dir(settings: TrainSettings) -> None:
    out = settings.save.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{PROBE_NAME}-{socket.gethostname()}-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        disk = exc.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1))
        cls = DiskError if disk else BadFileError
        raise cls(f"--output_dir {out}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                  "write to, or fix its permissions / remount it read-write") from None
    need = checkpoint_bytes(settings)
    free = shutil.disk_usage(out).free
    if free < need:
        raise DiskError(f"--output_dir {out}: {free / 2**20:.0f} MB free, one checkpoint needs about "
                        f"{need / 2**20:.0f} MB; free some space or choose another --output_dir")


OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "adafactor": 4}  # state per trained parameter


def checkpoint_bytes(settings: TrainSettings) -> int:
    """About how many bytes one save writes: the LoRA file, plus weights and optimizer state in a state folder.

    LoRA parameters: rank x (in + out) of every 2-D weight in the transformer blocks (from the header only).
    """
    from library.flux_loading import weight_files

    params = 0
    for f in weight_files(settings.model.dit_path, "--pretrained_model_name_or_path", "FLUX transformer",
                          ("transformer",)):
        header, _ = checkpoint_validation.read_safetensors_header(f)
        for key, meta in header.items():
            shape = meta.get("shape") if isinstance(meta, dict) else None
            if "blocks" in key and key.endswith(".weight") and isinstance(shape, list) and len(shape) == 2:
                params += settings.network.dim * (shape[0] + shape[1])
    total = params * 4  # the LoRA file (float32 at most)
    if settings.save.save_state or settings.save.save_state_on_train_end:
        kind = settings.optimizer.type.lower() or "adamw"
        total += params * (4 + OPTIMIZER_BYTES_PER_PARAM.get(kind, 8))
    return int(total * 1.1) + 2**20  # CLIP-L LoRA, metadata and small files


# ---------------------------------------------------------------- 4.-5. leftovers and the resume target


def settle_unfinished_saves(out: Path) -> None:
    # A run killed between the two renames that replace NAME-state gets that checkpoint back.
    for leftover in atomic_io.cleanup_leftovers(out, is_complete=checkpoint_validation.is_complete_staged):
        log.warning("removed an unfinished checkpoint left by a killed run: %s", leftover)


def resolve_resume(settings: TrainSettings) -> tuple[checkpoint_io.ResumeInfo | None, list[str]]:
    target, out, name = settings.save.resume, settings.save.output_dir, settings.save.output_name
    if not target:
        return None, []
    if settings.hub.resume_from_hub:  # --resume_from_huggingface: fetch the state folder first
        from library import hub_sync

        target = str(hub_sync.download_state(settings.hub, target, out))
    current = settings.resume_settings()
    if target != "auto":
        path = Path(target)
        if not path.is_dir():
            raise ResumeError(f"--resume {target}: not a state folder (expected NAME-...-state). "
                              f"List candidates with: python tools/find_checkpoint.py {out} --list")
        return checkpoint_io.inspect_state_folder(path, resume_settings=current), []
    ours, others, run_id, why = checkpoint_validation.resume_candidates(out, name)
    for cand in ours:
        checkpoint_validation.validate_candidate(cand)
        if not cand.valid:
            log.warning("--resume auto: skipping %s: %s", cand.path, cand.reason)
            continue
        info = checkpoint_io.inspect_state_folder(cand.path, resume_settings=current, validated=cand)
        return info, _explain_pick(cand, run_id, why, others)
    lines = [f"--resume auto: no valid state folder in {out}; starting from scratch"]
    if others:
        lines.append(f"--resume auto: {_describe_others(others)}")
    return None, lines


def _explain_pick(cand, run_id, why: str, others: list) -> list[str]:
    if not others:
        return []
    run = f"run {run_id}" if run_id is not None else "the states that name no run"
    return [f"--resume auto: continuing {run}, {why}: {cand.path.name} (step {cand.step}); "
            f"{_describe_others(others)}"]


def _describe_others(others: list) -> str:
    newest = others[0]
    runs = sorted({c.run_id for c in others})
    return (f"not taking {len(others)} state folder(s) of other runs ({', '.join(f'run {r}' for r in runs)}; "
            f"newest {newest.path.name} at step {newest.step}): they were trained with other settings or data. "
            f"To continue one of them, pass --resume PATH")


def check_weights_stay(settings: TrainSettings) -> None:
    """A new run moves the previous run's LoRA files away (run_identity): --network_weights must not be one."""
    weights = settings.network.weights
    if not weights:
        return
    moving = {f.path.resolve() for f in run_identity.run_files(settings.save.output_dir, settings.save.output_name)}
    if Path(weights).resolve() in moving:
        raise BadFlagError(f"--network_weights {weights} is a LoRA file of the previous run in --output_dir, and a new "
                           "run moves that run's files to runs/<id>/ first; copy the file elsewhere and pass that path, "
                           "or continue the previous run with --resume")


def _as_checkpoint(resume: checkpoint_io.ResumeInfo | None):
    if resume is None:
        return None
    return checkpoint_validation.CheckpointInfo(resume.path, "state", "", resume.step, resume.epoch, True, "",
                                                resume.has_manifest, 0.0, 0, run_id=resume.run_id)
