"""Per-step pieces of LoRA regularisation that the training loop calls: the dropout RNG and weight-norm scaling.

- `step_rng`: LoRA dropouts (--network_dropout, network_args rank_dropout/module_dropout) draw from torch's
  global RNG, as upstream, because gradient checkpointing saves and restores exactly that RNG when it re-runs a
  block. The global RNG is seeded from (seed, step, rank) for the step and restored afterwards, so the masks of
  step N are the same in a resumed run and nothing else in the process sees a different random stream.
- `scale_weight_norms`: upstream's --scale_weight_norms after each optimizer step, returning the progress-bar
  figures upstream shows ("Keys Scaled", "Average key norm") and logging max_norm/* tags.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def network_drops(network) -> bool:
    """True when any LoRA module has a training-time dropout (so the step needs its own RNG)."""
    return any(m.dropout or m.rank_dropout or m.module_dropout for m in network.lora_modules())


@contextlib.contextmanager
def step_rng(seed: int, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run the block with torch's global RNG (CPU, and the CUDA device in use) seeded by `seed`, then restore it."""
    if not enabled:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % (2**63))
        yield


def scale_weight_norms(network, max_norm: float | None, log: Callable[[dict], None] | None = None
                       ) -> dict[str, float]:
    """--scale_weight_norms: cap each module's weight norm; returns upstream's progress-bar postfix and hands
    upstream's max_norm/* tags to `log` (the tracker, at the step just taken)."""
    if not max_norm:
        return {}
    keys_scaled, mean_norm, maximum_norm = network.apply_max_norm_regularization(max_norm)
    if log is not None:
        log({"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": maximum_norm,
             "norm/avg_key_norm": mean_norm})
    return {"Keys Scaled": keys_scaled, "Average key norm": mean_norm}
