"""--weighted_captions: upstream's SD prompt-weight syntax, applied to FLUX's T5 token states.

- `parse_weighted`: `(text)` x1.1, `[text]` /1.1, `(text:1.5)` x1.5, nesting multiplies, `\\(` `\\)` `\\[` `\\]`
  `\\\\` are literal, an unclosed bracket weighs to the end, an unmatched closing one is text (upstream's rules).
- `token_weights`: one weight per T5 token of the plain caption (the syntax removed), from the tokenizer's
  character offsets, so the token ids are exactly those of the unweighted plain caption.
- `apply_token_weights`: states x weights, then rescaled so each caption's mean is unchanged (upstream's
  SD renormalisation). CLIP-L gets the plain caption: its pooled vector has no per-token axis.
"""
from __future__ import annotations

import re

import torch

ROUND = 1.1  # `(text)`; `[text]` divides by it
_ESCAPED = "()[]\\"
_EXPLICIT = re.compile(r":([+-]?[0-9.]+)\)")  # `:1.5)` closing a round bracket with its own factor


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a caption; neighbouring runs of equal weight are merged."""
    runs: list[list] = []  # [text, weight], weights scaled in place when a bracket closes
    rounds: list[int] = []  # index of the first run inside each open `(`
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if text[i + 1:i + 2] and text[i + 1] in _ESCAPED:
                runs.append([text[i + 1], 1.0])
                i += 2
            else:
                i += 1  # a lone backslash disappears, as upstream
            continue
        if ch in "([":
            (rounds if ch == "(" else squares).append(len(runs))
            i += 1
            continue
        explicit = _EXPLICIT.match(text, i) if ch == ":" else None
        if explicit is not None:
            factor = _number(explicit.group(1))
            if rounds and factor is not None:
                scale(rounds.pop(), factor)
                i = explicit.end()
                continue
            if not rounds:  # upstream keeps the whole `:1.5)` as text when no `(` is open
                runs.append([explicit.group(0), 1.0])
                i = explicit.end()
                continue
            # not a number (`:1.2.3)`): the colon is text and `)` closes the bracket normally
        if ch == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif ch == "]" and squares:
            scale(squares.pop(), 1 / ROUND)
        else:
            runs.append([ch, 1.0])
        i += 1
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, 1 / ROUND)
    merged: list[list] = []
    for piece, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged] or [("", 1.0)]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plain_caption(runs: list[tuple[str, float]]) -> str:
    """The caption with the weight syntax removed (what both encoders read)."""
    return "".join(piece for piece, _ in runs)


def char_weights(runs: list[tuple[str, float]]) -> list[float]:
    return [weight for piece, weight in runs for _ in piece]


def token_weights(offsets: list[tuple[int, int]], plain: str, weights: list[float]) -> list[float]:
    """Per token: the mean weight of the non-space characters it covers (all of them if only spaces);
    1.0 for special and padding tokens (empty span), as upstream pads weights with 1.0."""
    out = []
    for start, end in offsets:
        span = range(start, min(end, len(plain)))
        chosen = [weights[k] for k in span if not plain[k].isspace()] or [weights[k] for k in span]
        out.append(sum(chosen) / len(chosen) if chosen else 1.0)
    return out


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D] x weights [B, L], rescaled per caption so mean(result) == mean(hidden) (in float32)."""
    states = hidden.float()
    before = states.mean(dim=(1, 2))
    weighted = states * weights.to(states.device, torch.float32)[:, :, None]
    after = weighted.mean(dim=(1, 2))
    ratio = before / after
    # a zero mean after weighting (all weights 0) has no rescale that keeps the mean: keep the weighted states
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return (weighted * ratio[:, None, None]).to(hidden.dtype)
