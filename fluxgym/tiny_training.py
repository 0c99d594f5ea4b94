"""A tiny captioned dataset and the trainer arguments for the tiny models (fluxgym.tiny_flux).

What tools/benchmark.py and the tests train on: coloured images with captions, a FluxGym-style
dataset.toml, and the flag list that points the real trainer at tiny model files. PIL only.
"""

from __future__ import annotations

from pathlib import Path

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
    """The trainer's flags for the tiny models (CPU, no mixed precision, cached latents and text)."""
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
