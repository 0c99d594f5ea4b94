"""Helpers for tests that run the real trainer entry script on the tiny models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "sd-scripts" / "flux_train_network.py"
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200)]


def make_dataset(root: Path, count: int = 4, size: int = 64, trigger: str = "tok") -> tuple[Path, Path]:
    """Small coloured images with captions, and a FluxGym-style dataset.toml; returns (image_dir, toml)."""
    from PIL import Image, ImageDraw

    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", (size, size), COLOURS[i % len(COLOURS)])
        ImageDraw.Draw(img).ellipse([i * 3, i * 2, size // 2 + i * 3, size // 2 + i * 2], fill=(255, 255, 255))
        img.save(image_dir / f"img{i:02d}.png")
        (image_dir / f"img{i:02d}.txt").write_text(f"{trigger}, picture number {i}", encoding="utf-8")
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nshuffle_caption = false\ncaption_extension = '.txt'\nkeep_tokens = 1\n\n"
        f"[[datasets]]\nresolution = {size}\nbatch_size = 1\nkeep_tokens = 1\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{image_dir}'\n  class_tokens = '{trigger}'\n  num_repeats = 1\n",
        encoding="utf-8")
    return image_dir, toml


def trainer_args(models: dict, toml: Path, output_dir: Path, *extra: str, name: str = "tiny") -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(models["unet"]), "--clip_l", str(models["clip_l"]),
        "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]),
        "--tokenizer_cache_dir", str(models["tokenizer_cache_dir"]),
        "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
        "--save_model_as", "safetensors", "--sdpa", "--max_data_loader_n_workers", "0", "--seed", "42",
        "--mixed_precision", "no", "--network_module", "networks.lora_flux", "--network_dim", "4",
        "--optimizer_type", "adamw", "--learning_rate", "1e-3", "--dataset_config", str(toml),
        "--output_dir", str(output_dir), "--output_name", name, "--timestep_sampling", "shift",
        "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw", "--guidance_scale", "1.0",
        "--loss_type", "l2", *extra,
    ]


def run_trainer(args: list[str], *, launcher: str = "python", env: dict | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    python = REPO / ".venv" / "bin" / "python"
    python = str(python) if python.exists() else sys.executable
    if launcher == "accelerate":
        cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               str(SCRIPT), *args]
    else:
        cmd = [python, str(SCRIPT), *args]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO))


def run_trainer_in_process(args: list[str]) -> int:
    """flux_train_network.main(args) in this process (no interpreter start-up: a few seconds faster).

    accelerate keeps one process-wide state whose precision cannot change once set, so it is reset
    before and after; tests that need to monkeypatch the trainer's modules use this.
    """
    import flux_train_network
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        return flux_train_network.main(args)
    finally:
        AcceleratorState._reset_state(True)


def marker_groups(text: str) -> dict[str, list[str]]:
    """What the supervisor's parser (library.console_markers.MARKERS) finds in console output, by group."""
    from library.console_markers import MARKERS

    found: dict[str, list[str]] = {}
    for m in MARKERS.finditer(text):
        for name, value in m.groupdict().items():
            if value is not None and name in ("desc", "ep", "saving", "caching_latents", "caching_text",
                                              "sampling", "done", "failed"):
                found.setdefault(name, []).append(value)
    return found
