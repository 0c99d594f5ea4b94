"""Opt-in run statistics for hardware checks: mean step time and the CUDA peak, printed once at the end.

`FLUXTRAIN_RUN_STATS=1` makes the training loop print `console_markers.RUN_STATS` after its last
step (main process only). tools/gpu_check.py sets it and reads the line back; nothing is printed
or measured otherwise.
"""
from __future__ import annotations

import os
import time

from library import console_markers

ENV_VAR = "FLUXTRAIN_RUN_STATS"


class StepClock:
    """Step end times of this run; the first step (warm-up, allocator growth) is left out of the mean."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    @classmethod
    def from_env(cls) -> "StepClock | None":
        return cls() if os.environ.get(ENV_VAR, "") not in ("", "0") else None

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())

    def mean_step_seconds(self) -> float:
        if len(self.ends) < 2:
            return 0.0
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)

    def report(self, device) -> str:
        import torch

        peak = torch.cuda.max_memory_allocated(device) if getattr(device, "type", "") == "cuda" else 0
        return console_markers.RUN_STATS.format(steps=len(self.ends), step_seconds=self.mean_step_seconds(),
                                                peak_bytes=int(peak))
