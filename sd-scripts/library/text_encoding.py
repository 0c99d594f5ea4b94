"""Caption -> FLUX text conditioning: CLIP-L pooled vector and T5 token states.

`FluxTextEncoder` tokenizes (CLIP padded to 77, T5 padded to `t5_max_length`), encodes with whichever
models it was given, and returns the tensors the transformer and the text-encoder cache use:
l_pooled [B, Dclip], t5_out [B, L, Dt5], txt_ids [B, L, 3] (zeros, as FLUX uses) and t5_attn_mask [B, L].
With `weighted_captions` both encoders read the caption with its weight syntax removed and the T5 states are
weighted per token (library.prompt_weights); cached outputs are then the weighted ones.
"""
from __future__ import annotations

from typing import Sequence

import torch

from library import prompt_weights

CLIP_LENGTH = 77


class FluxTextEncoder:
    def __init__(self, clip_tokenizer, t5_tokenizer, clip_model=None, t5_model=None, *,
                 t5_max_length: int, apply_t5_attn_mask: bool, weighted_captions: bool = False):
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.clip_model = clip_model
        self.t5_model = t5_model
        self.t5_max_length = int(t5_max_length)
        self.apply_t5_attn_mask = bool(apply_t5_attn_mask)
        self.weighted_captions = bool(weighted_captions)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and T5 mask; with weighted captions also `t5_weights` [B, L] (ids of the plain captions)."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        runs = [prompt_weights.parse_weighted(c) for c in captions] if self.weighted_captions else None
        if runs is not None:
            captions = [prompt_weights.plain_caption(r) for r in runs]
        clip = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                   return_tensors="pt")
        t5 = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
                               return_tensors="pt", return_offsets_mapping=runs is not None)
        tokens = {"clip_ids": clip["input_ids"].long(), "t5_ids": t5["input_ids"].long(),
                  "t5_attn_mask": t5["attention_mask"].long()}
        if runs is not None:
            # offsets (fast tokenizers, which load_t5_tokenizer always returns) map each token to its characters
            tokens["t5_weights"] = torch.tensor([
                prompt_weights.token_weights(offsets.tolist(), plain, prompt_weights.char_weights(r))
                for offsets, plain, r in zip(t5["offset_mapping"], captions, runs)], dtype=torch.float32)
        return tokens

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
        if "t5_weights" in tokens:
            t5_out = prompt_weights.apply_token_weights(t5_out, tokens["t5_weights"])
        b, length = tokens["t5_ids"].shape
        txt_ids = torch.zeros(b, length, 3, device=t5_out.device, dtype=t5_out.dtype)
        return {"l_pooled": l_pooled, "t5_out": t5_out, "txt_ids": txt_ids,
                "t5_attn_mask": tokens["t5_attn_mask"].to(t5_out.device)}
