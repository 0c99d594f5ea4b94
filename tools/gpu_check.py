"""One command for the day a CUDA machine is at hand: the trainer's own GPU paths, a few steps each.

    python tools/gpu_check.py [--json] [--only 12G,ddp-stall] [--work-dir DIR]

It builds the real-width FLUX model (hidden 3072, 1 double + 1 single block, `fluxgym.tiny_flux`),
then runs `sd-scripts/flux_train_network.py` through `accelerate launch` once per shape: plain
bf16, and each FluxGym VRAM preset exactly as `fluxgym.script.build_argv` emits it (fp8 base,
gradient checkpointing, 8-bit/Adafactor optimizers, block swap with CUDA streams for 12G/8G); with
two GPUs also a 2-process NCCL run whose rank 1 stalls (FLUXTRAIN_INJECT_HANG=step@1), which the
`ddp` guard must end. It prints peak VRAM (the run's own torch.cuda.max_memory_allocated, via
FLUXTRAIN_RUN_STATS), mean step time and the guard outcome per shape.

Exit codes: 0 every shape as expected, or no CUDA GPU (nothing to check); 1 a shape failed;
2 usage error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "sd-scripts") not in sys.path:  # entry script: the trainer's library and fluxgym by path
    sys.path[:0] = [str(REPO / "sd-scripts"), str(REPO)]

from library import console_markers  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TOTAL_BUDGET_S = 540.0  # the whole check stays under 10 minutes; shapes that would not fit are skipped
SHAPE_TIMEOUT_S = 180.0
DDP_TIMEOUT_MIN = "0.5"  # the stalled rank's peer gives up after 30 s
STEPS = 4  # images in the check's dataset: one epoch = 4 optimizer steps
GPU_PRESETS = ("24G", "20G", "16G", "12G", "8G")


@dataclass(frozen=True)
class Shape:
    name: str
    preset: str             # fluxgym preset whose flags the run uses
    min_vram_gb: float
    gpus: int = 1
    expect_guard: str = ""  # "" the run finishes (exit 0); else this hang guard must end it (non-zero exit)
    drop: tuple[str, ...] = ()   # preset flags taken out (the plain bf16 shape)
    extra: tuple[str, ...] = ()  # flags added after the preset's
    env: dict = field(default_factory=dict)


def all_shapes() -> list[Shape]:
    from fluxgym.presets import get_preset

    shapes = [Shape("bf16", "24G", get_preset("24G").min_vram_gb, drop=("--fp8_base", "--gradient_checkpointing"))]
    shapes += [Shape(name, name, get_preset(name).min_vram_gb) for name in GPU_PRESETS]
    shapes.append(Shape("ddp-stall", "24G", get_preset("24G").min_vram_gb, gpus=2, expect_guard="ddp",
                        extra=("--ddp_timeout", DDP_TIMEOUT_MIN), env={"FLUXTRAIN_INJECT_HANG": "step@1"}))
    return shapes


def select_shapes(shapes: list[Shape], *, gpu_count: int, vram_gb: float, only: list[str] | None = None
                  ) -> tuple[list[Shape], dict[str, str]]:
    """The shapes this machine can run, and why each other one is skipped."""
    chosen, skipped = [], {}
    for shape in shapes:
        if only and shape.name not in only:
            continue
        if gpu_count < shape.gpus:
            skipped[shape.name] = f"needs {shape.gpus} GPUs, found {gpu_count}"
        elif vram_gb < shape.min_vram_gb:
            skipped[shape.name] = f"needs {shape.min_vram_gb:g} GB of VRAM, the GPU has {vram_gb:.0f} GB"
        else:
            chosen.append(shape)
    return chosen, skipped


@dataclass
class Result:
    shape: str
    outcome: str                    # "ok", "guard ddp fired (exit 1)", "FAILED: ...", "skipped: ..."
    ok: bool
    exit_code: int | None = None
    peak_vram_gb: float | None = None
    step_s: float | None = None
    steps: int | None = None
    wall_s: float | None = None


def judge(shape: Shape, exit_code: int | None, output: str, wall_s: float) -> Result:
    """Read one run's exit code and console output: stats line, fired guards, the verdict."""
    stats = console_markers.RUN_STATS_RE.search(output)
    fired = [m.group("site") for m in console_markers.HANG_GUARD_RE.finditer(output)]
    result = Result(shape.name, "", False, exit_code, wall_s=round(wall_s, 1))
    if stats:
        result.steps = int(stats.group("steps"))
        result.step_s = float(stats.group("step_seconds"))
        result.peak_vram_gb = round(int(stats.group("peak_bytes")) / 2**30, 2)
    if exit_code is None:
        result.outcome = f"FAILED: no exit within {wall_s:.0f} s (killed)"
    elif shape.expect_guard:
        # accelerate's launcher reports a failed rank as its own exit 1; the rank itself exits 124
        if exit_code != 0 and shape.expect_guard in fired:
            result.outcome, result.ok = f"guard {shape.expect_guard} fired (exit {exit_code})", True
        else:
            result.outcome = (f"FAILED: expected guard {shape.expect_guard}, got exit {exit_code}, "
                              f"guards {', '.join(fired) or 'none'}")
    elif exit_code == 0 and stats and console_markers.MODEL_SAVED in output:
        result.outcome, result.ok = "ok", True
    elif fired:
        result.outcome = f"FAILED: guard {fired[0]} fired (exit {exit_code})"
    else:
        result.outcome = f"FAILED: exit {exit_code}: {_last_error(output)}"
    return result


def _last_error(output: str) -> str:
    """The trainer's own error line. accelerate's launcher re-raises a failed rank as
    `subprocess.CalledProcessError: Command [...]`, which names the command, not the cause (the first
    GPU check showed only that for every shape), so that line is passed over."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ("Error" in ln or ln.startswith("error:")) and "CalledProcessError" not in ln]
    return (errors or lines or ["no output"])[-1][:200]


def format_table(results: list[Result]) -> str:
    header = ("shape", "peak VRAM", "step time", "outcome", "wall")
    rows = [header]
    for r in results:
        rows.append((r.shape,
                     "-" if r.peak_vram_gb is None else f"{r.peak_vram_gb:.2f} GiB",
                     "-" if r.step_s is None else f"{r.step_s:.3f} s",
                     r.outcome,
                     "-" if r.wall_s is None else f"{r.wall_s:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- running (needs CUDA)

def gpu_inventory() -> tuple[int, float, list[str]]:
    """(count, VRAM of the smallest GPU in GB, names); (0, 0, []) without CUDA."""
    try:
        import torch
    except ImportError:
        return 0, 0.0, []
    if not torch.cuda.is_available():
        return 0, 0.0, []
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return len(props), min(p.total_memory for p in props) / 1e9, [p.name for p in props]


def _prepare(work: Path) -> tuple[object, dict[str, Path]]:
    from fluxgym.models import ModelFiles
    from fluxgym.tiny_flux import build_tiny_models

    paths = build_tiny_models(work / "models", seed=0, width="real")
    models = ModelFiles(None, paths["unet"], paths["clip_l"], paths["t5xxl"], paths["ae"],
                        paths["tokenizer_cache_dir"], local=True)
    return models, paths


def _dataset(work: Path, resolution: int) -> Path:
    from PIL import Image, ImageDraw

    from fluxgym.dataset_toml import dataset_config, render_dataset_toml

    images = work / f"data-{resolution}"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(STEPS):
        img = Image.new("RGB", (resolution, resolution), (40 + 50 * i, 120, 200 - 40 * i))
        ImageDraw.Draw(img).ellipse([i * 8, i * 8, resolution // 2, resolution // 2], fill=(250, 250, 250))
        img.save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"gpucheck, picture {i}", encoding="utf-8")
    toml = work / f"dataset-{resolution}.toml"
    config = dataset_config(images, resolution=resolution, trigger="gpucheck", repeats=1)
    toml.write_text(render_dataset_toml(config, ["tools/gpu_check.py"]), encoding="utf-8")
    return toml


def command_for(shape: Shape, models, toml: Path, out: Path) -> list[str]:
    """The trainer command FluxGym would run for this preset, one epoch, plus the shape's changes."""
    from fluxgym.presets import get_preset
    from fluxgym.script import TrainRequest, build_argv, launcher_argv

    preset = get_preset(shape.preset)
    req = TrainRequest(slug="gpucheck", root=REPO, preset=preset, models=models, dataset_config=toml,
                       output_dir=out, trainer_script=REPO / "sd-scripts" / "flux_train_network.py",
                       epochs=1, save_every=1, resolution=preset.resolution, workers=preset.workers,
                       extra=shape.extra)
    argv = [a for a in build_argv(req) if a not in shape.drop]
    launch = launcher_argv(req)
    if shape.gpus > 1:
        i = launch.index("--num_processes")
        launch[i + 1] = str(shape.gpus)
        launch[i:i] = ["--multi_gpu", "--main_process_port", "0"]  # 0: any free port
    return [sys.executable, *launch, str(req.trainer_script), *argv]


def run_shape(shape: Shape, cmd: list[str], timeout: float, out_dir: Path) -> Result:
    env = {**os.environ, "FLUXTRAIN_RUN_STATS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **shape.env}
    started = time.monotonic()
    # Own session: on a timeout the whole tree we started (accelerate and its ranks) is ended by group id.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    # The whole console beside the run, so a failed shape can be read after the machine is gone.
    (out_dir / "gpu_check-console.txt").write_text(output, encoding="utf-8")
    return judge(shape, code, output, time.monotonic() - started)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Run the trainer's GPU paths on the real-width model (CUDA only).")
    ap.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    ap.add_argument("--only", default="", help="comma-separated shape names (default: all that fit)")
    ap.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "gpu_check",
                    help="models, data and run folders (reused between checks)")
    return ap


@dataclass
class Args:
    json: bool
    only: list[str]
    work_dir: Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = Args(ns.json, [s for s in ns.only.split(",") if s], ns.work_dir)
    known = {s.name for s in all_shapes()}
    if unknown := [s for s in args.only if s not in known]:
        parser.error(f"--only: unknown shape(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    count, vram_gb, names = gpu_inventory()
    if count == 0:
        message = "no CUDA GPU found: nothing to check (run this on a machine with an NVIDIA GPU)"
        print(json.dumps({"gpus": [], "results": [], "skipped": message}) if args.json else message)
        return EXIT_OK
    shapes, skipped = select_shapes(all_shapes(), gpu_count=count, vram_gb=vram_gb, only=args.only)
    if not args.json:
        print(f"{count} GPU(s): {', '.join(names)}; {len(shapes)} shape(s) to run", flush=True)
    models, _ = _prepare(args.work_dir)
    results, deadline = [], time.monotonic() + TOTAL_BUDGET_S
    for shape in shapes:
        left = deadline - time.monotonic()
        if left < 60:
            results.append(Result(shape.name, "skipped: the 10-minute budget is spent", True))
            continue
        toml = _dataset(args.work_dir, _resolution(shape))
        out = args.work_dir / "runs" / shape.name
        _clear(out)
        result = run_shape(shape, command_for(shape, models, toml, out), min(SHAPE_TIMEOUT_S, left), out)
        results.append(result)
        if not args.json:
            print(f"  {shape.name}: {result.outcome}", flush=True)
    results += [Result(name, f"skipped: {why}", True) for name, why in skipped.items()]
    ok = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"gpus": names, "results": [dataclasses.asdict(r) for r in results], "ok": ok}))
    else:
        print(format_table(results))
    return EXIT_OK if ok else EXIT_FAILED


def _resolution(shape: Shape) -> int:
    from fluxgym.presets import get_preset

    return get_preset(shape.preset).resolution


def _clear(out: Path) -> None:
    """A fresh run folder per shape, so a state folder from the last check is never resumed."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


if __name__ == "__main__":
    sys.exit(main())
