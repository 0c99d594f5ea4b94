"""`generate`: validate the inputs, then write train.sh, train.bat, dataset.toml and sample_prompts.txt.

Values come from the CLI (or a UI) as `GenerateOptions`; preset defaults fill what the user left out.
All checks run before any file is written; files are replaced atomically. `run.json` records what the
runner needs later (preset, model files) so `train` can re-check the model files before launching.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fluxgym import __version__
from fluxgym.atomic_files import write_text_atomic
from fluxgym.dataset_toml import dataset_config, render_dataset_toml
from fluxgym.models import missing_files, resolve_base_model
from fluxgym.naming import ProjectPaths, check_one_line, claim_slug, project_paths
from fluxgym.prepare import DatasetError, MIN_IMAGES, list_images
from fluxgym.presets import get_preset
from fluxgym.script import TrainRequest, build_argv, header_lines, per_step_options, render_bat, render_sh

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAINER = REPO_ROOT / "sd-scripts" / "flux_train_network.py"
RUN_INFO = "run.json"


class GenerateError(ValueError):
    """A value that cannot produce a valid training run; names the option."""


@dataclass
class GenerateOptions:
    name: str
    vram: str
    root: Path = field(default_factory=Path.cwd)
    trigger: str | None = None  # None: the LoRA name
    base_model: str = "flux-dev"
    epochs: int = 16
    save_every: int = 4
    repeats: int = 10
    resolution: int | None = None  # None: the preset's default
    lr: str = "8e-4"
    rank: int = 4
    seed: int = 42
    workers: int | None = None  # None: the preset's default
    sample_prompts: Path | None = None  # a file of prompts; None: the trigger is the prompt
    sample_every: int = 0
    resume: str | None = None  # "auto" or a state folder
    checkpointing: bool = True
    extra: list[str] = field(default_factory=list)
    trainer_script: Path | None = None  # None: this repository's sd-scripts/flux_train_network.py
    launcher: str = "accelerate"


@dataclass(frozen=True)
class GenerateResult:
    paths: ProjectPaths
    files: dict[str, Path]
    argv: list[str]
    missing_models: list[Path]
    expected_steps: int


def _check_numbers(o: GenerateOptions, resolution: int, workers: int) -> None:
    for flag, value, low in (("--epochs", o.epochs, 1), ("--save-every", o.save_every, 1),
                             ("--repeats", o.repeats, 1), ("--rank", o.rank, 1), ("--workers", workers, 0),
                             ("--sample-every", o.sample_every, 0), ("--resolution", resolution, 16)):
        if value < low:
            raise GenerateError(f"{flag} must be at least {low}, got {value}")
    if resolution % 16:
        raise GenerateError(f"--resolution must be a multiple of 16 (FLUX packs 2x2 latents of 1/8 size); "
                            f"got {resolution}, try {resolution // 16 * 16 or 16} or {(resolution // 16 + 1) * 16}")
    try:
        ok = float(o.lr) > 0
    except ValueError:
        ok = False
    if not ok:
        raise GenerateError(f"--lr must be a positive number, got {o.lr!r}")
    if o.launcher not in ("accelerate", "python"):
        raise GenerateError(f"--launcher must be accelerate or python, got {o.launcher!r}")


def _resume_value(o: GenerateOptions) -> str | None:
    if o.resume in (None, "", "auto"):
        return o.resume or None
    path = Path(o.resume).expanduser().resolve()
    if not path.is_dir():
        raise GenerateError(f"--resume: state folder not found: {path}")
    return str(path)


def _sample_prompts_text(o: GenerateOptions, trigger: str) -> str:
    if o.sample_prompts is None:
        return trigger + "\n"
    path = Path(o.sample_prompts)
    if not path.is_file():
        raise GenerateError(f"--sample-prompts: file not found: {path}")
    return path.read_text(encoding="utf-8")


def build_request(o: GenerateOptions, *, check_dataset: bool = True) -> tuple[TrainRequest, ProjectPaths, str]:
    """Validate everything and return the request (no files written). Third item: sample prompts text.

    `check_dataset=False` is for previews (the web UI) before the dataset folder is filled."""
    preset = get_preset(o.vram)
    paths = project_paths(o.root, o.name)
    resolution = o.resolution if o.resolution is not None else preset.resolution
    workers = o.workers if o.workers is not None else preset.workers
    _check_numbers(o, resolution, workers)
    if check_dataset and not paths.dataset_dir.is_dir():
        raise DatasetError(f"dataset folder not found: {paths.dataset_dir}; run "
                           f"`python -m fluxgym prepare {paths.slug} --images DIR` first")
    if check_dataset and len(list_images(paths.dataset_dir)) < MIN_IMAGES:
        raise DatasetError(f"{paths.dataset_dir} has fewer than {MIN_IMAGES} images; run `prepare` again")
    models = resolve_base_model(paths.root, o.base_model)
    trigger = o.name if o.trigger is None else check_one_line(o.trigger, "--trigger")
    prompts = _sample_prompts_text(o, trigger)
    sampling = o.sample_every > 0 and bool(prompts.strip())
    req = TrainRequest(
        slug=paths.slug, root=paths.root, preset=preset, models=models,
        dataset_config=paths.out("dataset.toml"), output_dir=paths.output_dir,
        trainer_script=Path(o.trainer_script).resolve() if o.trainer_script else DEFAULT_TRAINER,
        trigger=trigger, epochs=o.epochs, save_every=o.save_every, resolution=resolution, lr=str(o.lr),
        rank=o.rank, seed=o.seed, workers=workers,
        sample_prompts=paths.out("sample_prompts.txt") if sampling else None,
        sample_every=o.sample_every, resume=_resume_value(o), checkpointing=o.checkpointing,
        launcher=o.launcher, extra=tuple(o.extra),
    )
    return req, paths, prompts


def render_files(req: TrainRequest, paths: ProjectPaths, prompts: str, repeats: int) -> dict[str, str]:
    """The text of train.sh, train.bat, dataset.toml and sample_prompts.txt (pure; `generate` writes them)."""
    argv = build_argv(req)
    toml_header = header_lines(req, "sh")[:2] + [
        "Written with real TOML escaping: the trigger round-trips exactly.",
        f"Used by outputs/{req.slug}/train.sh; `generate` rewrites this file.",
    ]
    config = dataset_config(paths.dataset_dir, resolution=req.resolution, trigger=req.trigger, repeats=repeats,
                            shuffle_caption="shuffle_caption" in per_step_options(req)[0])
    prompt_header = "".join(f"# {h}\n" for h in header_lines(req, "sh")[:2])
    return {"train.sh": render_sh(req, argv), "train.bat": render_bat(req, argv),
            "dataset.toml": render_dataset_toml(config, toml_header), "sample_prompts.txt": prompt_header + prompts}


def generate(o: GenerateOptions) -> GenerateResult:
    req, paths, prompts = build_request(o)
    claim_slug(paths, o.name)
    argv = build_argv(req)
    texts = render_files(req, paths, prompts, o.repeats)
    files = {name: paths.out(name) for name in texts}
    write_text_atomic(files["train.sh"], texts["train.sh"], mode=0o755)
    write_text_atomic(files["train.bat"], texts["train.bat"], newline="")
    write_text_atomic(files["dataset.toml"], texts["dataset.toml"])
    write_text_atomic(files["sample_prompts.txt"], texts["sample_prompts.txt"])
    info = {"generator": f"fluxgym {__version__}", "slug": req.slug, "preset": req.preset.name,
            "preset_version": req.preset.version, "base_model": o.base_model,
            "model_files": {k: str(v) for k, v in req.models.files().items()},
            "fetch": req.models.fetch, "epochs": req.epochs, "checkpointing": req.checkpointing}
    write_text_atomic(paths.out(RUN_INFO), json.dumps(info, indent=2) + "\n")
    missing = missing_files(req.models)
    if missing:
        log.warning("model files not present yet (needed before `train`): %s", ", ".join(map(str, missing)))
    steps = len(list_images(paths.dataset_dir)) * o.repeats * req.epochs
    return GenerateResult(paths, files, argv, missing, steps)
