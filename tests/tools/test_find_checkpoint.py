"""tools/find_checkpoint.py and checkpoint discovery over the corruption zoo (one folder per defect)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_zoo
from library import checkpoint_validation as cv
from tools import find_checkpoint as fc

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "fixtures" / "ckpt_zoo_golden.json"


@pytest.mark.parametrize("case", sorted(ckpt_zoo.ZOO))
def test_zoo_discovery_picks_newest_valid_and_logs_skips(tmp_path, case, caplog):
    out, expected, reason = ckpt_zoo.build_case(tmp_path, case)
    with caplog.at_level(logging.WARNING, logger="library.checkpoint_validation"):
        best = cv.newest_valid_state(out)
    assert best is not None and best.path.name == expected
    assert best.valid and best.reason == ""
    cands = cv.discover(out)
    assert cands[0].valid is False or cands[0].path.name == expected
    if reason is not None:
        assert reason in caplog.text, caplog.text
        skipped = [c for c in cands if not c.valid and c.label != "leftover"]
        assert len(skipped) == 1 and reason in skipped[0].reason
    # leftovers are listed as invalid, never chosen, never touched
    for c in cands:
        if c.path.name.startswith("."):
            assert not c.valid and c.label == "leftover" and c.path.exists()


def test_iter_valid_states_falls_back_lazily(tmp_path):
    out, _, _ = ckpt_zoo.build_case(tmp_path, "mixed_epoch_and_step")
    it = cv.iter_valid_states(out, "demo", log=False)
    assert [next(it).step, next(it).step] == [300, 250]
    assert next(it, None) is None
    assert list(cv.iter_valid_states(out, "other", log=False)) == []


def test_step_order_ignores_mtime_and_name_width(tmp_path):
    out, _, _ = ckpt_zoo.build_case(tmp_path, "step_999_vs_1000")
    assert [c.step for c in cv.discover(out)] == [1000, 999]


def test_step_source_fallbacks(tmp_path):
    out = tmp_path / "o"
    ckpt_zoo.write_state(out, "demo", step=40, manifest=False)  # upstream: train_state.json
    p = ckpt_zoo.write_state(out, "demo", step=70)
    (p / "checkpoint.json").write_text("garbage")
    (p / "train_state.json").unlink()  # neither source: the number in the name orders it
    by_name = {c.path.name: c for c in cv.discover(out)}
    assert by_name["demo-step00000040-state"].step_source == "train_state.json"
    assert by_name["demo-step00000070-state"].step_source == "name" and by_name["demo-step00000070-state"].step == 70
    assert cv.newest_valid_state(out, log=False).step == 40


def test_lora_zero_tail_and_truncation_detected(tmp_path):
    good = ckpt_zoo.write_lora(tmp_path, "demo", step=10, ss_steps=10)
    z = ckpt_zoo.write_lora(tmp_path, "demo", step=20, ss_steps=20)
    t = ckpt_zoo.write_lora(tmp_path, "demo", step=30, ss_steps=30)
    ckpt_zoo.zero_tail(z, 16)
    ckpt_zoo.truncate(t, 16)
    assert cv.validate_lora_file(good).valid
    assert "zero-filled" in cv.validate_lora_file(z).reason
    assert "truncated" in cv.validate_lora_file(t).reason
    assert cv.newest_valid_model(tmp_path, log=False).path == good
    # without our hash only the size check is possible: a zeroed tail then passes (documented limit)
    (tmp_path / "p").mkdir()
    plain = ckpt_zoo.write_lora(tmp_path / "p", "x", epoch=1, data_hash=False)
    ckpt_zoo.zero_tail(plain, 16)
    assert cv.validate_lora_file(plain).valid


def test_names_roundtrip():
    assert cv.parse_name("my-lora-step00000999-state", "state") == ("my-lora", "step", 999)
    assert cv.parse_name("my-lora-000004-state", "state") == ("my-lora", "epoch", 4)
    assert cv.parse_name("my-lora-state", "state") == ("my-lora", "last", None)
    assert cv.parse_name("my-lora-step00000100.safetensors", "model") == ("my-lora", "step", 100)
    assert cv.parse_name("my-lora.safetensors", "model") == ("my-lora", "last", None)
    assert cv.state_dir_name("n", step=100) == "n-step00000100-state"
    assert cv.lora_file_name("n", epoch=4) == "n-000004.safetensors"


# ---------------------------------------------------------------- CLI


def test_cli_default_prints_newest_and_resume_commands(tmp_path, capsys):
    out, expected, _ = ckpt_zoo.build_case(tmp_path, "zero_filled_tail")
    (out / "train.sh").write_text("#!/bin/bash\n")
    assert fc.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert f"newest valid state folder: {out / expected}" in text
    assert f"bash {out / 'train.sh'} --resume {out / expected}" in text
    assert "python -m fluxgym" not in text, "a train.sh alone does not make a fluxgym folder"
    assert "skipped demo-step00000200-state: optimizer.bin content does not match" in text


def test_resume_command_fits_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLUXGYM_ROOT", raising=False)
    from fluxgym.demo import build_demo
    from fluxgym.naming import resolve_existing

    # A plain sd-scripts output folder: neither train.sh nor fluxgym's run.json.
    plain = tmp_path / "plain"
    state = ckpt_zoo.write_state(plain, "demo", step=20)
    assert fc.main([str(plain)]) == 0
    text = capsys.readouterr().out
    assert f"to resume:\n  add `--resume {state}` to your training command" in text
    assert "fluxgym" not in text and "bash" not in text
    assert fc.main([str(plain), "--json"]) == 0
    newest = json.loads(capsys.readouterr().out)["newest"]["state"]
    assert newest["resume_commands"] == [] and newest["resume_args"] == ["--resume", str(state)]

    # A folder `generate` made (the real thing, via the demo set-up without models): both commands, and the
    # fluxgym one resolves to this very folder.
    root = tmp_path / "proj"
    build_demo(root, models=False)
    out = root / "outputs" / "demo"
    assert (out / "run.json").is_file()
    state = ckpt_zoo.write_state(out, "demo", step=30)
    assert fc.main([str(out)]) == 0
    cmds = [ln.strip() for ln in capsys.readouterr().out.split("resume with:\n")[1].splitlines()]
    assert cmds == [f"bash {out / 'train.sh'} --resume {state}", f"python -m fluxgym resume demo --root {root}"]
    assert resolve_existing(root, "demo").output_dir == out
    monkeypatch.setattr(fc, "_REPO", root)  # a project inside the checkout needs no --root...
    assert fc.resume_commands(out, cv.newest_valid_state(out, log=False))[1] == "python -m fluxgym resume demo"
    monkeypatch.setenv("FLUXGYM_ROOT", str(tmp_path))  # ...unless FLUXGYM_ROOT points elsewhere
    assert fc.resume_commands(out, cv.newest_valid_state(out, log=False))[1].endswith(f"--root {root}")

    # The same folder moved elsewhere: fluxgym would not find it, so only its train.sh is offered.
    moved = tmp_path / "moved"
    out.rename(moved)
    assert fc.main([str(moved)]) == 0
    assert "python -m fluxgym" not in capsys.readouterr().out


def test_cli_exit_codes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fc.main([str(empty)]) == 3
    assert fc.main([]) == 2
    assert fc.main([str(tmp_path / "missing")]) == 2
    assert fc.main([str(empty), "--type", "bogus"]) == 2
    assert fc.main([str(empty), "--prune-keep", "0"]) == 2
    assert fc.main([str(empty), "--dry-run"]) == 2
    out, expected, _ = ckpt_zoo.build_case(tmp_path, "missing_optimizer")
    assert fc.main(["--validate", str(out / expected)]) == 0
    assert fc.main(["--validate", str(out / "demo-step00000200-state")]) == 3
    assert "optimizer.bin listed in the manifest is missing" in capsys.readouterr().out
    assert fc.main(["--validate", str(tmp_path / "nope")]) == 2


def test_cli_type_model_and_all(tmp_path, capsys):
    out, _, _ = ckpt_zoo.build_case(tmp_path, "upstream_without_manifest")
    ckpt_zoo.write_lora(out, "demo", step=150, ss_steps=150)
    assert fc.main([str(out), "--type", "model"]) == 0
    assert "newest valid LoRA file" in capsys.readouterr().out
    assert fc.main([str(out), "--type", "all", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["newest"]["state"]["path"].endswith("demo-state")
    assert res["newest"]["model"]["path"].endswith("demo-step00000150.safetensors")


def _golden_tree(root: Path) -> Path:
    out, _, _ = ckpt_zoo.build_case(root, "mixed_epoch_and_step")
    ckpt_zoo.write_state(out, "demo", step=330, manifest=False, folder="demo-state", mtime=ckpt_zoo.T0 + 30)
    (out / ".demo-step00000400-state.tmp-999999-0badf00d").mkdir()
    ckpt_zoo.write_lora(out, "demo", step=300, ss_steps=300, mtime=ckpt_zoo.T0)
    (out / "train.sh").write_text("#!/bin/bash\n")
    return out


def _normalise(obj, out: Path):
    if isinstance(obj, dict):
        return {k: ("<mtime>" if k == "mtime" else _normalise(v, out)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalise(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(out), "<OUT>")
    return obj


def test_cli_json_golden(tmp_path, capsys):
    out = _golden_tree(tmp_path)
    assert fc.main([str(out), "--type", "all", "--list", "--json"]) == 0
    got = _normalise(json.loads(capsys.readouterr().out), out)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())


def test_cli_list_text(tmp_path, capsys):
    out = _golden_tree(tmp_path)
    assert fc.main([str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split()[0] for ln in lines if ln.startswith("  demo") or ln.startswith("  .demo")]
    assert rows == ["demo-state", "demo-000004-state", "demo-000003-state", "demo-step00000250-state",
                    ".demo-step00000400-state.tmp-999999-0badf00d"]
    assert any("INVALID: leftover temporary folder" in ln for ln in lines)


def test_prune_keep(tmp_path, capsys):
    out = tmp_path / "run"
    for s in (100, 200, 300, 400):
        ckpt_zoo.write_state(out, "demo", step=s)
    ckpt_zoo.zero_tail(ckpt_zoo.write_state(out, "demo", step=500) / "model.safetensors", 8)
    left = out / ".demo-step00000600-state.tmp-999999-0badf00d"
    left.mkdir()
    live = out / f".demo-step00000700-state.tmp-{os.getppid()}-0badf00d"  # a running process's save in progress
    live.mkdir()

    assert fc.main([str(out), "--prune-keep", "2", "--dry-run"]) == 0
    assert len(list(out.glob("demo-step*-state"))) == 5
    assert "would delete" in capsys.readouterr().out

    assert fc.main([str(out), "--prune-keep", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sorted(Path(p).name for p in rep["deleted"]) == ["demo-step00000100-state", "demo-step00000200-state"]
    assert {Path(i["path"]).name for i in rep["invalid"]} == {"demo-step00000500-state", left.name, live.name}
    assert sorted(p.name for p in out.glob("demo-step*-state")) == [
        "demo-step00000300-state", "demo-step00000400-state", "demo-step00000500-state"]
    assert not list(out.glob(".*.trash-*"))

    assert fc.main([str(out), "--prune-keep", "2", "--prune-invalid"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["demo-step00000300-state", "demo-step00000400-state", live.name])


def test_tool_imports_no_heavy_modules_and_validation_imports_fast(tmp_path):
    out, _, _ = ckpt_zoo.build_case(tmp_path, "leftover_temp")
    code = (
        "import sys, runpy\n"
        "try:\n    runpy.run_path(%r, run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "heavy = ('torch', 'numpy', 'safetensors', 'accelerate', 'transformers', 'diffusers')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', bad)\n"
    ) % str(REPO / "tools" / "find_checkpoint.py")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    assert "RC 0 HEAVY []" in res.stdout, res.stdout + res.stderr

    timing = (
        "import sys, time; sys.path.insert(0, %r); t = time.process_time();\n"
        "import library.checkpoint_validation; print(time.process_time() - t)"
    ) % str(REPO / "sd-scripts")
    best = min(
        float(subprocess.run([sys.executable, "-S", "-c", timing], capture_output=True, text=True, timeout=30).stdout)
        for _ in range(5)
    )
    # CPU time, not wall time: the import cost itself, unaffected by other jobs on a shared machine
    assert best < 0.05, f"checkpoint_validation import took {best * 1000:.1f} ms of CPU"
