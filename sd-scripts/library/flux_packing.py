"""Latent packing for the FLUX transformer (2x2 patches -> tokens) and positional image ids.

`pack_latents` turns [B, C, H, W] latents into [B, (H/2)(W/2), 4C] tokens, channel-major inside a patch
(the BFL and diffusers order); `unpack_latents` inverts it; `image_ids` gives the [(H/2)(W/2), 3]
(0, row, col) ids diffusers expects. H and W are latent sizes (image size / 8) throughout.
"""
from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 patches (image size a multiple of 16)")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`; h, w are the latent height and width (not the image size)."""
    b, n, d = x.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"cannot unpack {tuple(x.shape)} into a {h}x{w} latent")
    c = d // 4
    x = x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, batch: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(h/2)(w/2), 3] ids (0, row, col) for a packed h x w latent. diffusers takes 2-D ids shared by the
    batch, so `batch` is accepted for API symmetry and ignored."""
    del batch
    rows = torch.arange(h // 2, device=device, dtype=dtype)
    cols = torch.arange(w // 2, device=device, dtype=dtype)
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)
