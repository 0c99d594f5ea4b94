"""Console lines that other programs parse: each marker is defined once, here.

Readers: the run supervisor's progress parser (`fluxgym/supervise/`, formerly
`tools/monitor_progress.py`, through MARKERS/OPEN_BAR/HINTS below), FluxGym's own app and users'
scripts that grep upstream logs. Writers: library/trainer.py, train_loop.py, caching.py and
hang_guards.py print these constants, never their own copy of the text. The texts are upstream
sd-scripts' own, so the same parser works on upstream runs too. Change one only together with its
reader; tests/sd_scripts/test_console_markers.py pins that what the trainer prints is matched.
"""
from __future__ import annotations

import re

STEPS_BAR_DESC = "steps"                       # tqdm description of the training bar: "steps:  40%|...| 4/10"
EPOCH_LINE = "epoch {epoch}/{total}"           # printed on its own line when an epoch starts (1-based)
SAVING_CHECKPOINT = "saving checkpoint: {path}"  # before each LoRA file is written
SAVING_STATE = "saving state at {what}"        # before a state folder is written ("step 10", "epoch 2")
SAVING_LAST_STATE = "saving last state."
CACHING_LATENTS = "caching latents..."          # printed once, then a tqdm bar named CACHING_LATENTS_BAR
CACHING_LATENTS_BAR = "caching latents"
CACHING_TEXT = "caching Text Encoder outputs..."
CACHING_TEXT_BAR = "caching Text Encoder outputs"
GENERATING_SAMPLES = "generating sample images at step: {step}"
MODEL_SAVED = "model saved."                   # the run wrote its final LoRA
HANG_GUARD = "HANG GUARD [{site}]: {detail}"  # a hang guard fired; the process exits 124
STALL_DUMP = "STALL: no progress for {seconds:g} s"
# Only with FLUXTRAIN_RUN_STATS=1 (library/run_stats.py); read by tools/gpu_check.py through RUN_STATS_RE.
RUN_STATS = "run stats: {steps} steps, {step_seconds:.4f} s/step after the first, peak cuda memory {peak_bytes} bytes"
RUN_STATS_RE = re.compile(r"run stats: (?P<steps>\d+) steps, (?P<step_seconds>[\d.]+) s/step after the first, "
                          r"peak cuda memory (?P<peak_bytes>\d+) bytes")
HANG_GUARD_RE = re.compile(r"HANG GUARD \[(?P<site>\w+)\]")  # tools/gpu_check.py: which guard fired

# What the supervisor's parser matches. `_BAR` reads a tqdm counter with an optional description;
# tqdm ends a redraw with no line end, so OPEN_BAR reads the last one before its terminator arrives.
_BAR = r"(?P<bar>(?:(?P<desc>[A-Za-z][\w ]*?):\s*)?\d{1,3}%\|[^|\n]*\|\s*(?P<n>\d+)/(?P<m>\d+))"
OPEN_BAR = re.compile(_BAR + r"(?=\s*\[)")
MARKERS = re.compile(
    _BAR
    + r"|^\s*epoch (?P<ep>\d+)/(?P<eps>\d+)\s*$"
    + r"|(?P<saving>saving checkpoint|saving state|saving last state)"
    + r"|(?P<caching_latents>caching latents)"
    + r"|(?P<caching_text>caching Text Encoder outputs)"
    + r"|(?P<sampling>generating sample images)"
    + r"|(?P<done>model saved\.)"
    + r"|(?P<failed>HANG GUARD \[)",
    re.M,
)
# Cheap substring tests so a flood of unrelated output never reaches the regex engine.
HINTS = ("%|", "epoch ", "saving", "caching", "generating sample", "model saved", "HANG GUARD")
