"""The trainer command line and the scripts that run it.

`build_argv` is pure: a `TrainRequest` -> the trainer's argv in FluxGym's flag order (fluxgym-compat
§1.3) with our changes (checkpointing on, explicit block swap, no `--split_mode`). `render_sh` quotes
every token with POSIX rules (shlex.quote); `render_bat` with cmd.exe rules, and refuses values that
cmd cannot carry safely. Both scripts cd to the project root and pass extra arguments on.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from fluxgym import __version__
from fluxgym._paths import use_sd_scripts
from fluxgym.models import ModelFiles
from fluxgym.presets import Preset

STATE_KEEP = 2  # newest epoch state folders kept by the trainer's rotation


@dataclass(frozen=True)
class TrainRequest:
    """Everything one generated training run depends on (UI/CLI values after preset defaults)."""

    slug: str
    root: Path
    preset: Preset
    models: ModelFiles
    dataset_config: Path
    output_dir: Path
    trainer_script: Path
    trigger: str = ""
    epochs: int = 16
    save_every: int = 4
    resolution: int = 512
    lr: str = "8e-4"
    rank: int = 4
    seed: int = 42
    workers: int = 2
    sample_prompts: Path | None = None  # None: sampling off
    sample_every: int = 0
    resume: str | None = None  # "auto" or an absolute state-folder path
    checkpointing: bool = True
    timestep_sampling: str = "shift"
    guidance_scale: str = "1.0"
    launcher: str = "accelerate"  # or "python": run the trainer script directly
    extra: tuple[str, ...] = field(default_factory=tuple)


def _model_args(req: TrainRequest) -> list[str]:
    m = req.models
    args = ["--pretrained_model_name_or_path", str(m.unet), "--clip_l", str(m.clip_l),
            "--t5xxl", str(m.t5xxl), "--ae", str(m.ae)]
    if m.tokenizer_cache_dir is not None:
        # Our trainer never downloads tokenizers; local models ship theirs.
        args += ["--tokenizer_cache_dir", str(m.tokenizer_cache_dir)]
    return args


def per_step_options(req: TrainRequest) -> tuple[list[str], list[str]]:
    """(caption options, image options) that the extra (advanced-panel) flags turn on. Each changes its
    input every step, so the trainer refuses it with the matching cache flag (as upstream does); the
    generated script then leaves that cache flag out instead of handing the user a script that exits 2."""
    use_sd_scripts()
    from library import cache_rules

    return (cache_rules.options_turned_on(req.extra, cache_rules.PER_STEP_CAPTION_OPTIONS),
            cache_rules.options_turned_on(req.extra, cache_rules.PER_STEP_IMAGE_OPTIONS))


def _loader_args(req: TrainRequest) -> list[str]:
    cache = [] if per_step_options(req)[1] else ["--cache_latents_to_disk"]
    args = [*cache, "--save_model_as", "safetensors", "--sdpa"]
    # torch refuses persistent workers when there are none.
    if req.preset.persistent_workers and req.workers > 0:
        args.append("--persistent_data_loader_workers")
    return args + ["--max_data_loader_n_workers", str(req.workers), "--seed", str(req.seed)]


def _save_args(req: TrainRequest) -> list[str]:
    args = ["--max_train_epochs", str(req.epochs), "--save_every_n_epochs", str(req.save_every)]
    if req.checkpointing:
        # A state folder next to each saved LoRA is what makes `resume` possible (FluxGym #72).
        args += ["--save_state", "--save_last_n_epochs_state", str(STATE_KEEP)]
    return args


def build_argv(req: TrainRequest) -> list[str]:
    """Trainer arguments (after the script path), in FluxGym's order; pure."""
    p = req.preset
    argv = _model_args(req) + _loader_args(req)
    if p.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    argv += ["--mixed_precision", p.mixed_precision, "--save_precision", "bf16",
             "--network_module", "networks.lora_flux", "--network_dim", str(req.rank)]
    argv += p.block_args()
    if req.sample_prompts is not None and req.sample_every > 0:
        argv += ["--sample_prompts", str(req.sample_prompts), "--sample_every_n_steps", str(req.sample_every)]
    argv += ["--learning_rate", req.lr]
    if not per_step_options(req)[0]:
        argv += ["--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"]
    if p.fp8_base:
        argv.append("--fp8_base")
    if p.highvram:
        argv.append("--highvram")
    argv += _save_args(req)
    argv += ["--dataset_config", str(req.dataset_config), "--output_dir", str(req.output_dir),
             "--output_name", req.slug, "--timestep_sampling", req.timestep_sampling,
             "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
             "--guidance_scale", req.guidance_scale, "--loss_type", "l2"]
    if req.resume:
        argv += ["--resume", req.resume]
    return argv + list(req.extra)


def launcher_argv(req: TrainRequest) -> list[str]:
    """What goes between the interpreter and the trainer script."""
    if req.launcher == "python":
        return []
    # One process: without an accelerate config a multi-GPU box would start one per GPU (FluxGym #383).
    # num_machines/dynamo_backend are explicit so the launch does not depend on (or warn about) a config.
    return ["-m", "accelerate.commands.launch", "--mixed_precision", req.preset.mixed_precision,
            "--num_cpu_threads_per_process", "1", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no"]


def header_lines(req: TrainRequest, kind: str) -> list[str]:
    """The comment block every generated file starts with (no user text except the safe slug)."""
    p = req.preset
    ckpt = (f"on: a state folder every {req.save_every} epoch(s), newest {STATE_KEEP} kept"
            if req.checkpointing else "off (--no-checkpointing): a killed run cannot be resumed")
    run = ("bash outputs/{s}/train.sh   (any directory works with the full path; it cd's to the project root)"
           if kind == "sh" else "outputs\\{s}\\train.bat")
    return [
        f"Generated by fluxgym {__version__} for LoRA '{req.slug}'. Regenerate instead of editing by hand.",
        f"Preset: {p.label} ({p.description})",
        "Run:        " + run.format(s=req.slug),
        f"Supervised: python -m fluxgym train {req.slug}   (persisted log, exit-code check, stop with Ctrl-C)",
        f"Resume:     python -m fluxgym resume {req.slug}   (or pass --resume <state folder> to this script)",
        f"Checkpointing: {ckpt}",
        "Extra arguments given to this script are passed on to the trainer (the last value of a flag wins).",
    ] + _cache_notes(req)


def _cache_notes(req: TrainRequest) -> list[str]:
    captions, images = per_step_options(req)
    notes = []
    if captions:
        notes.append(f"No text-encoder cache: {', '.join('--' + n for n in captions)} change(s) the caption every step.")
    if images:
        notes.append(f"No latent cache: {', '.join('--' + n for n in images)} change(s) the image every step "
                     "(the autoencoder encodes each batch).")
    return notes


def _sh_line_groups(tokens: list[str]) -> list[list[str]]:
    """One line per flag with its values (cosmetic only: each token is quoted on its own)."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def _root_relative_sh(path: Path, root: Path) -> str:
    try:
        return '"$ROOT"/' + shlex.quote(path.relative_to(root).as_posix())
    except ValueError:
        return shlex.quote(str(path))


def render_sh(req: TrainRequest, argv: list[str]) -> str:
    lines = ["#!/usr/bin/env bash"] + [f"# {h}".rstrip() for h in header_lines(req, "sh")]
    lines += [
        f"ROOT={shlex.quote(str(req.root))}",
        'cd "$ROOT" || { echo "train.sh: cannot change to the project root $ROOT" >&2; exit 1; }',
        "# The project's environment first; FLUXGYM_PYTHON overrides it.",
        'if [ -n "${FLUXGYM_PYTHON:-}" ]; then PY="$FLUXGYM_PYTHON"',
        'elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"',
    ]
    trainer_venv = req.trainer_script.parent.parent / ".venv" / "bin" / "python"
    if trainer_venv.parent.parent.parent != req.root:
        # The trainer lives in another checkout: its environment is the next best choice.
        lines.append(f"elif [ -x {shlex.quote(str(trainer_venv))} ]; then PY={shlex.quote(str(trainer_venv))}")
    lines += [
        "elif command -v python3 >/dev/null 2>&1; then PY=python3",
        "else PY=python",
        "fi",
    ]
    if req.launcher == "python":
        lines.append("# exec: the trainer replaces this shell, so its exit code is the script's and signals reach it.")
    else:
        # accelerate's launcher forwards no signal to the trainer; the trainer ends itself when its launcher does.
        lines.append("# exec: the launcher replaces this shell, so signals reach it and its exit code is the script's;"
                     " the trainer stops when its launcher ends.")
    head = ['exec "$PY"'] + [" ".join(g) for g in _sh_line_groups(launcher_argv(req))]
    head.append(_root_relative_sh(req.trainer_script, req.root))
    body = [" ".join(shlex.quote(t) for t in g) for g in _sh_line_groups(argv)]
    cmd = head + body + ['"$@"']
    lines.append(" \\\n    ".join(cmd))
    return "\n".join(lines) + "\n"


_BAT_SAFE = re.compile(r"^[A-Za-z0-9_\-.:/\\+=,]+$")


class BatQuoteError(ValueError):
    """A value that cmd.exe cannot pass through safely (double quote, line break, NUL)."""


def bat_quote(value: str) -> str:
    """Quote one argument for a .bat file: cmd's %-expansion and the C runtime's quote rules."""
    if any(c in value for c in '"\r\n\0'):
        raise BatQuoteError("contains a double quote or a line break")
    if _BAT_SAFE.match(value):
        return value
    # Inside "..." cmd treats & | < > ^ ( ) literally; % still expands in a batch file, so it is doubled.
    escaped = value.replace("%", "%%")
    # The C runtime reads \" as a literal quote: double the backslashes that end the value.
    trailing = len(escaped) - len(escaped.rstrip("\\"))
    return '"' + escaped + "\\" * trailing + '"'


def _bat_refusal(req: TrainRequest, bad_flag: str, why: str) -> str:
    lines = ["@echo off"] + [f"rem {h}".rstrip() for h in header_lines(req, "bat")]
    lines += [
        f"echo train.bat: the value of {bad_flag} {why}; cmd.exe cannot pass it safely. 1>&2",
        "echo Rename the file or folder, or run train.sh with bash (Git Bash, WSL). 1>&2",
        "exit /b 2",
    ]
    return "\r\n".join(lines) + "\r\n"


def render_bat(req: TrainRequest, argv: list[str]) -> str:
    """train.bat (CRLF). Values cmd cannot carry give a script that explains and exits 2."""
    flag = "the project root"
    try:
        root_q = bat_quote(str(req.root))
        quoted = []
        for tok in [str(req.trainer_script)] + argv:
            flag = tok if tok.startswith("--") else flag
            quoted.append(bat_quote(tok))
    except BatQuoteError as exc:
        return _bat_refusal(req, flag, str(exc))
    root_set = root_q[1:-1] if root_q.startswith('"') else root_q
    lines = ["@echo off"] + [f"rem {h}".rstrip() for h in header_lines(req, "bat")]
    lines += [
        "setlocal DisableDelayedExpansion",
        f'set "ROOT={root_set}"',
        'cd /d "%ROOT%" || exit /b 1',
        'set "PY=python"',
        'if exist "%ROOT%\\.venv\\Scripts\\python.exe" set "PY=%ROOT%\\.venv\\Scripts\\python.exe"',
        'if defined FLUXGYM_PYTHON set "PY=%FLUXGYM_PYTHON%"',
    ]
    groups = _sh_line_groups(launcher_argv(req))
    head = ['"%PY%"'] + [" ".join(g) for g in groups] + [quoted[0]]
    body_groups = _sh_line_groups(argv)
    it = iter(quoted[1:])
    body = [" ".join(next(it) for _ in g) for g in body_groups]
    lines.append(" ^\r\n    ".join(head + body + ["%*"]))
    lines.append("exit /b %ERRORLEVEL%")
    return "\r\n".join(lines) + "\r\n"
