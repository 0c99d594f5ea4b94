"""What the trainer prints is what library.console_markers.MARKERS (the supervisor's parser) matches."""
from __future__ import annotations

import re

import pytest

from library import console_markers as cm
from train_helpers import make_dataset, run_trainer_in_process, trainer_args


def _groups(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for m in cm.MARKERS.finditer(text):
        for name, value in m.groupdict().items():
            if value is not None and name in ("desc", "ep", "saving", "caching_latents", "caching_text",
                                              "sampling", "done", "failed"):
                found.setdefault(name, []).append(value)
    return found


def test_a_training_run_prints_every_marker_the_parser_reads(tiny_models, tmp_path, capfd, monkeypatch):
    _, toml = make_dataset(tmp_path / "data", count=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok --w 32 --h 32 --s 1 --d 1\n", encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setenv("FLUXTRAIN_RUN_STATS", "1")  # the opt-in line tools/gpu_check.py reads
    # One step: the first sample, caching, one epoch line, then the final save with its state folder.
    args = trainer_args(tiny_models, toml, out, "--max_train_steps", "1", "--save_state",
                        "--sample_prompts", str(prompts), "--sample_at_first")
    assert run_trainer_in_process(args) == 0
    captured = capfd.readouterr()
    text = captured.out + captured.err
    found = _groups(text)

    assert found["ep"] == ["1"]
    assert "steps" in found["desc"]
    assert set(found["saving"]) == {"saving checkpoint", "saving state", "saving last state"}
    assert found["caching_latents"] and found["caching_text"] and found["sampling"]
    assert found["done"] == ["model saved."]
    # "saving checkpoint: PATH" and "saving state at ..." name what was written
    saved = re.findall(r"^saving checkpoint: (.+)$", captured.out, re.M)
    assert saved == [str(p) for p in out.glob("*.safetensors")] == [str(out / "tiny.safetensors")]
    assert cm.SAVING_STATE.format(what="epoch 1") in captured.out and (out / "tiny-state").is_dir()
    assert cm.GENERATING_SAMPLES.format(step=0) in captured.out
    stats = cm.RUN_STATS_RE.search(captured.out)
    assert stats and stats.group("steps") == "1" and stats.group("peak_bytes") == "0"  # CPU: no CUDA peak
    bars = [m for m in cm.OPEN_BAR.finditer(captured.err) if m.group("desc") == cm.STEPS_BAR_DESC]
    assert bars and bars[-1].group("n") == bars[-1].group("m") == "1"


def test_hang_guard_line_is_the_marker(tmp_path, capsys):
    from library.hang_guards import HangGuards

    guards = HangGuards(tmp_path, None, stall_dump_timeout=0, exit_func=lambda code: None)
    try:
        with pytest.raises(SystemExit):
            guards.fire("save", "writing x-state within 1 s")
    finally:
        guards.close()
    err = capsys.readouterr().err
    assert _groups(err)["failed"] == ["HANG GUARD ["]
    assert cm.HANG_GUARD.format(site="save", detail="writing x-state within 1 s") in err


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
