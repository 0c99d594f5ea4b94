"""Per-step caption processing with upstream sd-scripts' meaning, made reproducible.

Order, as upstream: whole-caption dropout (`caption_dropout_rate`, or every `caption_dropout_every_n_epochs`-th
epoch, 1-based) gives ""; otherwise wildcards (`enable_wildcard`: one line of a multi-line caption, then each
`{a|b|c}` replaced by one choice, `{{`/`}}` stay literal braces), else the first line; then, with
`shuffle_caption` or `caption_tag_dropout_rate`, the caption is split at `caption_separator` into a fixed head
(`keep_tokens` tags, or the part before `keep_tokens_separator`), the shuffled/dropped middle and a fixed tail
(after a second `keep_tokens_separator`), joined with ", "; finally `secondary_separator` becomes
`caption_separator`.

Upstream draws from the global `random` module, so a resumed run sees other captions. Here every draw comes
from a `random.Random` seeded by (seed, epoch, item, occurrence within the epoch), so the caption of a batch
depends only on its place in the run, in any worker, and a resume reproduces it exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass

from library.cache_rules import PER_STEP_CAPTION_OPTIONS

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """A subset's caption settings (dataset.toml keys / command-line fallbacks of the same names)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @property
    def is_static(self) -> bool:
        """True when the processed caption is the same at every step (so encoder outputs can be cached)."""
        return not per_step_options(self)

    @property
    def is_identity(self) -> bool:
        """True when processing returns the caption unchanged (the common case: no work per item)."""
        return self.is_static and not self.secondary_separator


def per_step_options(opts: CaptionOptions) -> list[str]:
    """The option names that make the caption change from step to step (they forbid a text-encoder cache)."""
    return [name for name in PER_STEP_CAPTION_OPTIONS if getattr(opts, name) > 0]  # switches: True > 0


def caption_rng(seed: int, epoch: int, index: int, occurrence: int = 0) -> random.Random:
    """The generator for one item's caption at one place of the run (a hash: no shared state between workers)."""
    digest = hashlib.sha256(f"caption:{seed}:{epoch}:{index}:{occurrence}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _resolve_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # `{{` and `}}` are literal braces: park them on markers that cannot occur in the text
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible middle, fixed tail) tags."""
    sep = opts.caption_separator
    marker = opts.keep_tokens_separator
    if marker and marker in caption:
        head, middle = caption.split(marker, 1)
        tail = ""
        if marker in middle:
            middle, tail = middle.split(marker, 1)
        parts = [[t.strip() for t in text.split(sep) if t.strip()] for text in (head, middle, tail)]
        return parts[0], parts[1], parts[2]
    tags = [t.strip() for t in caption.strip().split(sep)]  # empty tags kept here, as upstream
    keep = max(0, opts.keep_tokens)
    return tags[:keep], tags[keep:], []


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, epoch: int) -> str:
    """The caption used for one step; `epoch` is 1-based (upstream's count for caption_dropout_every_n_epochs)."""
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    caption = _resolve_wildcards(caption, rng) if opts.enable_wildcard else caption.split("\n")[0]
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0:
        head, middle, tail = _split_tags(caption, opts)
        if opts.shuffle_caption:
            rng.shuffle(middle)
        if opts.caption_tag_dropout_rate > 0:
            middle = [t for t in middle if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(head + middle + tail)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def static_caption(caption: str, opts: CaptionOptions) -> str:
    """The caption of a static subset (what the text-encoder cache encodes)."""
    if opts.is_identity:
        return caption
    return process_caption(caption, opts, random.Random(0), epoch=1)


def validation_caption(caption: str, opts: CaptionOptions, rng: random.Random) -> str:
    """A held-out image's caption: wildcards resolved by `rng`, no shuffle or dropout (comparable passes)."""
    if opts.is_static:
        return caption
    fixed = dataclasses.replace(opts, shuffle_caption=False, caption_dropout_rate=0.0,
                                caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0)
    return process_caption(caption, fixed, rng, epoch=1)
