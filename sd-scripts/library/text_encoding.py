"""Caption -> FLUX text conditioning: CLIP-L pooled vector and T5 token states.

`FluxTextEncoder` tokenizes (CLIP padded to 77, T5 padded to `t5_max_length`), encodes with whichever
models it was given, and returns the tensors the transformer and the text-encoder cache use:
l_pooled [B, Dclip], t5_out [B, L, Dt5], txt_ids [B, L, 3] (zeros, as FLUX uses) and t5_attn_mask [B, L].
"""
from __future__ import annotations

from typing import Sequence

import torch

CLIP_LENGTH = 77


class FluxTextEncoder:
    def __init__(self, clip_tokenizer, t5_tokenizer, clip_model=None, t5_model=None, *,
                 t5_max_length: int, apply_t5_attn_mask: bool):
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.clip_model = clip_model
        self.t5_model = t5_model
        self.t5_max_length = int(t5_max_length)
        self.apply_t5_attn_mask = bool(apply_t5_attn_mask)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        captions = [captions] if isinstance(captions, str) else list(captions)
        clip = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                   return_tensors="pt")
        t5 = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
                               return_tensors="pt")
        return {"clip_ids": clip["input_ids"].long(), "t5_ids": t5["input_ids"].long(),
                "t5_attn_mask": t5["attention_mask"].long()}

    @staticmethod
    def _device(model) -> torch.device:
        return next(model.parameters()).device

    def encode_clip(self, clip_ids: torch.Tensor) -> torch.Tensor:
        """Pooled CLIP-L output; gradients flow when the CLIP model is being trained."""
        if self.clip_model is None:
            raise RuntimeError("CLIP-L model is not loaded; cannot encode captions (is --clip_l set?)")
        out = self.clip_model(input_ids=clip_ids.to(self._device(self.clip_model)))
        return out.pooler_output

    def encode_t5(self, t5_ids: torch.Tensor, t5_attn_mask: torch.Tensor) -> torch.Tensor:
        if self.t5_model is None:
            raise RuntimeError("T5-XXL model is not loaded; cannot encode captions (is --t5xxl set?)")
        device = self._device(self.t5_model)
        # Upstream passes the mask to T5 only with --apply_t5_attn_mask; padding tokens then still
        # produce states, which the transformer is trained to see.
        mask = t5_attn_mask.to(device) if self.apply_t5_attn_mask else None
        return self.t5_model(input_ids=t5_ids.to(device), attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenize(captions)
        l_pooled = self.encode_clip(tokens["clip_ids"])
        t5_out = self.encode_t5(tokens["t5_ids"], tokens["t5_attn_mask"])
        b, length = tokens["t5_ids"].shape
        txt_ids = torch.zeros(b, length, 3, device=t5_out.device, dtype=t5_out.dtype)
        return {"l_pooled": l_pooled, "t5_out": t5_out, "txt_ids": txt_ids,
                "t5_attn_mask": tokens["t5_attn_mask"].to(t5_out.device)}
