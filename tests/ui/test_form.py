"""The New LoRA form without a browser: advanced panel <-> argv, settings files, the job summary words."""
from __future__ import annotations

import pytest

from fluxgym.webui import advanced
from fluxgym.webui.form import FieldError, TrainForm, load_settings_file, settings_file_text, trainer_parser
from fluxgym.webui.jobs_page import job_summary


def test_advanced_panel_round_trips_through_argv():
    flags = advanced.advanced_flags()
    by = {f.flag: i for i, f in enumerate(flags)}
    assert "--blocks_to_swap" in by and "--save_every_n_steps" in by and "--help" not in by
    assert "--output_dir" not in by and "--v2" not in by  # set by the form / refused upstream flags
    assert all(f.help or f.switch or f.flag for f in flags)
    values = [False if f.switch else "" for f in flags]
    values[by["--blocks_to_swap"]] = "6"
    values[by["--apply_t5_attn_mask"]] = True
    values[by["--optimizer_args"]] = "betas=(0.9,0.99) \"weight_decay=0.1\""
    argv = advanced.extra_from_values(flags, values)
    ns = trainer_parser().parse_args(argv)  # what the trainer will read
    assert ns.blocks_to_swap == 6 and ns.apply_t5_attn_mask is True
    assert ns.optimizer_args == ["betas=(0.9,0.99)", "weight_decay=0.1"]
    back, rest = advanced.values_from_extra(flags, argv + ["--unknown", "x"])
    assert back[by["--blocks_to_swap"]] == "6" and back[by["--apply_t5_attn_mask"]] is True
    assert rest == ["--unknown", "x"]
    values[by["--blocks_to_swap"]] = "'unclosed"
    with pytest.raises(FieldError, match="--blocks_to_swap"):
        advanced.extra_from_values(flags, values)


def test_settings_file_round_trip():
    form = TrainForm.from_mapping({"name": "Zoë \"q\" $(x)", "trigger": "tök", "vram": "16G", "epochs": 3,
                                   "sample_prompts": "a\nb", "extra": ["--blocks_to_swap", "4"], "resolution": ""})
    again = load_settings_file(settings_file_text(form))
    assert again == form and again.resolution is None
    with pytest.raises(FieldError, match="not a FluxGym settings file"):
        load_settings_file('{"name": "x"}')


def _job(**over):
    base = {"id": 3, "lora": "x", "state": "running", "phase": "training", "step": 5, "total_steps": 20,
            "epoch": 1, "it_per_s": 1.5, "eta_s": 10, "success": False, "lora_file": None, "error": None,
            "hint": None, "restarts": 0, "restarts_text": "", "stop_requested": False}
    base.update(over)
    return base


def test_summary_says_success_only_with_the_lora_file():
    assert "Training complete" in job_summary(_job(state="done", success=True, lora_file="/o/x.safetensors"))
    text = job_summary(_job(state="done", success=False))
    assert "no LoRA file was found" in text and "Training complete" not in text
    failed = job_summary(_job(state="failed", error="CUDA out of memory at step 3", hint="use the 12G preset"))
    assert "CUDA out of memory at step 3" in failed and "use the 12G preset" in failed
    assert "step 5/20" in job_summary(_job()) and "ETA 0m10s" in job_summary(_job())
    assert "ending the whole process tree" in job_summary(_job(stop_requested=True))
