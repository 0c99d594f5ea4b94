"""The Advanced panel: one input per trainer flag, built from the trainer's own parser.

Every option of `flux_train_network.setup_parser()` appears with its help text, except `--help`, the
upstream flags this trainer refuses, the flags the New LoRA form sets itself and those its dataset.toml
excludes. A switch is a checkbox; everything else is a text box whose words become argv elements (shlex
rules, so quotes group words).
Only inputs changed from their start value are passed on, after the generated flags (the last one wins).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from fluxgym.webui.form import FieldError, trainer_parser

# Set by the form or the preset (as FluxGym's own panel leaves out what its script writes).
FORM_DESTS = frozenset({
    "pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "tokenizer_cache_dir", "dataset_config", "output_dir",
    "output_name", "network_module", "network_dim", "learning_rate", "max_train_epochs", "save_every_n_epochs",
    "seed", "max_data_loader_n_workers", "sample_prompts", "sample_every_n_steps", "save_state",
    "save_last_n_epochs_state", "resume", "mixed_precision", "save_model_as",
})
# Left out because the form always writes a dataset.toml, which they cannot be combined with (the trainer
# refuses --dataset_class with --dataset_config); train.sh edited by hand can still use them.
NOT_WITH_FORM = frozenset({"dataset_class"})


@dataclass(frozen=True)
class AdvancedFlag:
    flag: str  # the first option string, e.g. --blocks_to_swap
    dest: str
    switch: bool  # takes no value: a checkbox
    group: str
    help: str
    default: str  # what the trainer uses when the flag is absent (shown, never sent)
    choices: tuple[str, ...] = ()


def _is_unsupported(action: argparse.Action) -> bool:
    from library.args import UnsupportedFlag  # importable once trainer_parser() has run (fluxgym._paths)

    return isinstance(action, UnsupportedFlag)


def advanced_flags() -> list[AdvancedFlag]:
    parser = trainer_parser()
    group_of = {id(a): g.title or "other" for g in parser._action_groups for a in g._group_actions}
    out = []
    for a in parser._actions:
        hidden = a.dest in FORM_DESTS or a.dest in NOT_WITH_FORM or a.help == argparse.SUPPRESS
        if not a.option_strings or a.dest == "help" or hidden:
            continue
        if _is_unsupported(a):
            continue
        switch = a.nargs == 0
        default = "" if a.default in (None, False, argparse.SUPPRESS) else str(a.default)
        choices = tuple(str(c) for c in a.choices if c is not None) if a.choices else ()
        out.append(AdvancedFlag(a.option_strings[0], a.dest, switch, group_of.get(id(a), "other"),
                                a.help or "", default, choices))
    return out


def extra_from_values(flags: list[AdvancedFlag], values: list) -> list[str]:
    """argv elements for the inputs that were set (checkbox on, or a non-empty text)."""
    argv: list[str] = []
    for spec, value in zip(flags, values):
        if spec.switch:
            if value:
                argv.append(spec.flag)
            continue
        text = (value or "").strip() if isinstance(value, str) else ("" if value is None else str(value))
        if not text:
            continue
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise FieldError("extra", f"{spec.flag}: {exc} (close the quote)") from exc
        argv += [spec.flag, *words]
    return argv


def values_from_extra(flags: list[AdvancedFlag], extra: list[str]) -> tuple[list, list[str]]:
    """Inverse of extra_from_values for a loaded settings file: (panel values, arguments left over)."""
    by_flag = {f.flag: i for i, f in enumerate(flags)}
    values: list = [False if f.switch else "" for f in flags]
    rest: list[str] = []
    i = 0
    while i < len(extra):
        tok = extra[i]
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        if tok in by_flag:
            k = by_flag[tok]
            values[k] = True if flags[k].switch else shlex.join(extra[i + 1:j])
        else:
            rest += extra[i:j]
        i = j
    return values, rest
