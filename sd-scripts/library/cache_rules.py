"""Which options change a training input every step, so that a cache made once cannot serve them.

Upstream refuses these together with the matching cache flag, and so does the trainer's preflight
(library.option_settings). FluxGym's script generator (fluxgym.script) reads the same lists to leave
the cache flags out of a generated train.sh when the advanced panel turned such an option on; one
definition here keeps the two from drifting. Stdlib only: fluxgym imports it without torch.
"""
from __future__ import annotations

from typing import Sequence

# dataset options (flag and dataset.toml key share the name) whose caption differs from step to step
PER_STEP_CAPTION_OPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                            "caption_tag_dropout_rate", "enable_wildcard")
# options whose pixels differ from step to step (face_crop_aug_range works once per cache, as upstream)
PER_STEP_IMAGE_OPTIONS = ("random_crop", "color_aug")
_SWITCHES = {"shuffle_caption", "enable_wildcard", "random_crop", "color_aug"}  # store_true flags


def text_cache_flag(in_memory: bool, to_disk: bool) -> str | None:
    """The text-encoder cache flag the user gave, as a message names it (the disk flag implies the cache)."""
    return "--cache_text_encoder_outputs_to_disk" if to_disk else "--cache_text_encoder_outputs" if in_memory else None


def latent_cache_flag(in_memory: bool, to_disk: bool) -> str | None:
    """The latent cache flag the user gave, as a message names it (the disk flag implies the cache)."""
    return "--cache_latents_to_disk" if to_disk else "--cache_latents" if in_memory else None


def options_turned_on(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """The options of `names` that the argument list turns on: a switch present, or a value flag whose
    last value is not zero (`--caption_dropout_rate 0` leaves captions alone)."""
    on: dict[str, bool] = {}
    for i, token in enumerate(argv):
        flag, eq, inline = token.partition("=")
        name = flag[2:] if flag.startswith("--") else ""
        if name not in names:
            continue
        if name in _SWITCHES:
            on[name] = True
            continue
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        try:
            on[name] = float(value) != 0
        except ValueError:
            on[name] = True  # not a number: the trainer's own check names it
    return [name for name in names if on.get(name)]
