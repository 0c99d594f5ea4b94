"""Sample images during training, with sd-scripts' prompt-file syntax and file names.

Responsibilities: parse `--sample_prompts` files (.txt with `--w --h --d --s --l --g --n` options, .toml,
.json) into `SamplePrompt`s; name sample PNGs like upstream; run a small FLUX Euler flow loop on the
loaded (LoRA-hooked) transformer from precomputed text embeddings, so no tokenizer or hub is involved;
decode with the AE and write each PNG atomically inside the caller's per-image hang guard.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, ContextManager

from library import disk_errors
from library.atomic_io import atomic_file
from library.errors import BadFileError
from library.fault_injection import inject_point

logger = logging.getLogger(__name__)

DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_GUIDANCE = 512, 20, 3.5
MIN_SIZE, SIZE_MULTIPLE = 64, 16  # AE downsamples by 8 and FLUX packs 2x2 latent patches
_OPTION_SPLIT = re.compile(r"\s+--(?=[A-Za-z])")
# Options upstream's sampler knows that have no meaning for this FLUX sampler: accepted and ignored.
_IGNORED_OPTIONS = {"ss", "cn", "ctr", "rcfg", "f", "am", "c", "t", "fs", "gr"}
# FLUX.1-dev's scheduler settings (resolution-dependent shift); schnell uses an unshifted schedule.
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


class SamplePromptError(BadFileError):
    """A --sample_prompts file cannot be read or has a malformed entry."""


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    cfg_scale: float = 1.0  # true CFG with the negative prompt when != 1 (upstream `--l`)
    source: str = field(default="", compare=False)

    def texts_to_encode(self) -> list[str]:
        """Every string whose text-encoder outputs sampling will ask `encode_prompt` for."""
        return [self.prompt] + ([self.negative_prompt] if self.cfg_scale != 1.0 else [])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) rounded down to a multiple of 16, at least 64."""
        return _round_size(self.width), _round_size(self.height)


def _round_size(value: int) -> int:
    return max(MIN_SIZE, int(value) - int(value) % SIZE_MULTIPLE)


# ----- prompt files ------------------------------------------------------------------------------------
def parse_sample_prompts(path) -> list[SamplePrompt]:
    """Read a --sample_prompts file. Errors name the file (and line) and what to fix."""
    path = Path(path)
    if not path.is_file():
        raise SamplePromptError(f"--sample_prompts: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SamplePromptError(f"--sample_prompts: cannot read {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            return _prompts_from_data(tomllib.loads(text), path)
        except tomllib.TOMLDecodeError as exc:
            raise SamplePromptError(f"--sample_prompts: {path} is not valid TOML: {exc}") from exc
    if suffix == ".json":
        try:
            return _prompts_from_data(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise SamplePromptError(f"--sample_prompts: {path} is not valid JSON: {exc}") from exc
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, f"{path}:{lineno}"))
    return prompts


def parse_prompt_line(line: str, where: str = "<prompt>") -> SamplePrompt:
    """`a photo of sks --w 768 --h 512 --d 42 --s 28 --g 3.5 --l 1.0 --n blurry` -> SamplePrompt."""
    parts = _OPTION_SPLIT.split(line.strip())
    values: dict = {"prompt": parts[0].strip(), "source": where}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        key, value = key.lower(), value.strip()
        converters = {"w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int),
                      "l": ("cfg_scale", float), "g": ("guidance_scale", float), "n": ("negative_prompt", str)}
        if key in converters:
            name, kind = converters[key]
            try:
                values[name] = kind(value)
            except ValueError:
                raise SamplePromptError(f"--sample_prompts: {where}: option --{key} needs a number, got "
                                        f"{value!r}") from None
        elif key in _IGNORED_OPTIONS:
            logger.warning("%s: option --%s is not used by the FLUX sampler; ignored", where, key)
        else:
            logger.warning("%s: unknown option --%s ignored (known: --w --h --d --s --l --g --n)", where, key)
    return _checked(values, where)


_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "steps": "steps", "scale": "cfg_scale",
              "guidance_scale": "guidance_scale"}


def _prompts_from_data(data, path: Path) -> list[SamplePrompt]:
    """Upstream layouts: `[prompt]` defaults + `[[prompt.subset]]` entries, or a plain list of dicts."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        defaults = {k: v for k, v in data["prompt"].items() if k != "subset"}
        entries = [{**defaults, **sub} for sub in data["prompt"].get("subset", [])]
    elif isinstance(data, list):
        entries = data
    else:
        raise SamplePromptError(f"--sample_prompts: {path}: expected a [prompt] table with [[prompt.subset]] "
                                "entries, or a list of prompt objects")
    prompts = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise SamplePromptError(f"--sample_prompts: {where}: each entry needs a 'prompt' string")
        values = {"source": where}
        for key, value in entry.items():
            if key in _DICT_KEYS:
                values[_DICT_KEYS[key]] = value
            else:
                logger.warning("%s: key %r is not used by the FLUX sampler; ignored", where, key)
        prompts.append(_checked(values, where))
    return prompts


def _checked(values: dict, where: str) -> SamplePrompt:
    try:
        prompt = SamplePrompt(**values)
        prompt.width, prompt.height, prompt.steps = int(prompt.width), int(prompt.height), int(prompt.steps)
        prompt.seed = None if prompt.seed is None else int(prompt.seed)
        prompt.guidance_scale, prompt.cfg_scale = float(prompt.guidance_scale), float(prompt.cfg_scale)
        prompt.negative_prompt = str(prompt.negative_prompt or "")
    except (TypeError, ValueError) as exc:
        raise SamplePromptError(f"--sample_prompts: {where}: {exc}") from None
    if prompt.width <= 0 or prompt.height <= 0:
        raise SamplePromptError(f"--sample_prompts: {where}: width and height must be positive")
    prompt.steps = max(1, min(1000, prompt.steps))  # upstream clamps the same way
    return prompt


def sample_image_path(output_dir, output_name: str, step: int, idx: int, now: datetime | None = None, *,
                      epoch: int | None = None, seed: int | None = None) -> Path:
    """Upstream's names: `sample/<NAME>_<step:06d>_<idx:02d>_<YYYYmmddHHMMSS>.png`, `e<epoch:06d>` instead of
    the step for epoch-end samples, and `_<seed>` appended when the prompt fixes a seed (`--d`)."""
    now = now or datetime.now()
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return Path(output_dir) / "sample" / f"{output_name}_{number}_{idx:02d}_{now:%Y%m%d%H%M%S}{seed_suffix}.png"


# ----- generation --------------------------------------------------------------------------------------
def generate_samples(*, transformer, ae, encode_prompt: Callable[[str], dict], prompts, output_dir,
                     output_name: str, step: int, device, dtype, is_schnell: bool,
                     per_image_guard: Callable[[int], ContextManager] | None = None,
                     network=None, before_forward: Callable[[], None] | None = None,
                     apply_t5_attn_mask: bool = False, epoch: int | None = None) -> list[Path]:
    """Generate one PNG per prompt; returns the written paths. Modules are put in eval mode and restored.

    `network` (optional) is put in eval mode too so LoRA dropout is off; `before_forward` runs before every
    transformer call (block swap must re-prepare its layout for forward-only passes)."""
    import torch

    device = torch.device(device)
    modules = [m for m in (transformer, ae, network) if m is not None]
    was_training = [m.training for m in modules]
    ae_device = next(ae.parameters()).device
    written: list[Path] = []
    try:
        for m in modules:
            m.eval()
        if ae_device != device:
            ae.to(device)
        for idx, prompt in enumerate(prompts):
            guard = per_image_guard(idx) if per_image_guard is not None else contextlib.nullcontext()
            with guard:
                inject_point("sample")
                with torch.no_grad():
                    image = _generate_image(transformer, ae, encode_prompt, prompt, device, dtype, is_schnell,
                                            before_forward, apply_t5_attn_mask)
                path = sample_image_path(output_dir, output_name, step, idx, epoch=epoch, seed=prompt.seed)
                _save_png_atomic(image, path)
            logger.info("sample %d/%d written: %s", idx + 1, len(prompts), path)
            written.append(path)
    finally:
        if ae_device != device:
            ae.to(ae_device)
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return written


def _conditioning(encode_prompt, text: str, device, dtype) -> dict:
    raw = encode_prompt(text)
    t5_out = raw["t5_out"]
    t5_out = t5_out if t5_out.dim() == 3 else t5_out[None]
    l_pooled = raw["l_pooled"]
    l_pooled = l_pooled if l_pooled.dim() == 2 else l_pooled[None]
    txt_ids = raw.get("txt_ids")
    if txt_ids is None:
        txt_ids = t5_out.new_zeros(t5_out.shape[1], 3)
    elif txt_ids.dim() == 3:
        txt_ids = txt_ids[0]
    mask = raw.get("t5_attn_mask")
    return {"t5_out": t5_out.to(device, dtype), "l_pooled": l_pooled.to(device, dtype),
            "txt_ids": txt_ids.to(device, dtype), "t5_attn_mask": None if mask is None else mask.to(device)}


def _generate_image(transformer, ae, encode_prompt, prompt: SamplePrompt, device, dtype, is_schnell,
                    before_forward, apply_t5_attn_mask):
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from library.flow_matching import flux_mu
    from library.flux_packing import image_ids, pack_latents, unpack_latents

    width, height = prompt.size
    vae_scale = 2 ** (len(ae.config.block_out_channels) - 1)
    lat_h, lat_w = height // vae_scale, width // vae_scale
    channels = transformer.config.in_channels // 4
    cond = _conditioning(encode_prompt, prompt.prompt, device, dtype)
    uncond = _negative_conditioning(encode_prompt, prompt, device, dtype)
    seed = prompt.seed if prompt.seed is not None else secrets.randbits(63)
    # CPU generator: the same seed gives the same image on any device, and the global RNG (training
    # reproducibility) is left untouched.
    noise = torch.randn(1, channels, lat_h, lat_w, generator=torch.Generator("cpu").manual_seed(seed))
    x = pack_latents(noise).to(device)
    img_ids = image_ids(lat_h, lat_w, 1, device, dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((1,), prompt.guidance_scale, device=device, dtype=torch.float32)

    scheduler = FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if is_schnell else DEV_SCHEDULER))
    sigmas = np.linspace(1.0, 1.0 / prompt.steps, prompt.steps)  # the last step goes from 1/steps to 0
    mu = None if is_schnell else flux_mu(x.shape[1])  # the shift training uses
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def predict(c, t):
        if before_forward is not None:
            before_forward()
        mask = None
        if apply_t5_attn_mask and c["t5_attn_mask"] is not None:
            img = torch.ones(1, x.shape[1], dtype=torch.bool, device=device)
            mask = {"attention_mask": torch.cat([c["t5_attn_mask"].bool().reshape(1, -1), img], 1)[:, None, None]}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = transformer(hidden_states=x.to(dtype), timestep=(t / 1000).expand(1).float(), guidance=guidance,
                              pooled_projections=c["l_pooled"], encoder_hidden_states=c["t5_out"],
                              txt_ids=c["txt_ids"], img_ids=img_ids, joint_attention_kwargs=mask,
                              return_dict=False)[0]
        return out.float()

    for t in scheduler.timesteps:
        pred = predict(cond, t)
        if uncond is not None:
            pred_neg = predict(uncond, t)
            pred = pred_neg + prompt.cfg_scale * (pred - pred_neg)
        x = scheduler.step(pred, t, x, return_dict=False)[0]
    return _decode(ae, unpack_latents(x, lat_h, lat_w), device)


def _negative_conditioning(encode_prompt, prompt: SamplePrompt, device, dtype):
    if prompt.cfg_scale == 1.0:
        return None
    try:
        return _conditioning(encode_prompt, prompt.negative_prompt, device, dtype)
    except Exception as exc:  # a missing cached embedding must not end a long training run
        logger.warning("%s: no text embedding for the negative prompt (%s: %s); sampling without CFG",
                       prompt.source or "sample prompt", type(exc).__name__, exc)
        return None


def _decode(ae, latents, device):
    import numpy as np
    import torch
    from PIL import Image

    scaling = ae.config.scaling_factor or 1.0
    shift = getattr(ae.config, "shift_factor", None) or 0.0
    ae_dtype = next(ae.parameters()).dtype
    z = (latents / scaling + shift).to(device, ae_dtype)
    pixels = ae.decode(z).sample[0].float().clamp(-1, 1)
    array = ((pixels + 1) * 127.5).round().to("cpu", dtype=torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _save_png_atomic(image, path: Path) -> None:
    """Readers (and a monitor watching the folder) never see half a PNG: temp name, fsync, rename."""
    with disk_errors.saving("a sample image", path, hint=disk_errors.HINT_SAMPLE), atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


__all__ = ["SamplePrompt", "SamplePromptError", "parse_sample_prompts", "parse_prompt_line", "sample_image_path",
           "generate_samples"]
