"""tools/gpu_check.py on a machine without CUDA: shape selection, the trainer command per preset,
reading a run's output, the table, and the no-GPU exit. The GPU runs themselves need a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from library import console_markers as cm
from tools import gpu_check as gc


def _shape(name):
    return next(s for s in gc.all_shapes() if s.name == name)


def test_shapes_selected_by_gpu_count_and_vram():
    shapes = gc.all_shapes()
    chosen, skipped = gc.select_shapes(shapes, gpu_count=1, vram_gb=24.0)
    assert [s.name for s in chosen] == ["bf16", "24G", "20G", "16G", "12G", "8G"]
    assert skipped == {"ddp-stall": "needs 2 GPUs, found 1"}
    chosen, skipped = gc.select_shapes(shapes, gpu_count=1, vram_gb=12.5)
    assert [s.name for s in chosen] == ["12G", "8G"]
    assert skipped["16G"] == "needs 16 GB of VRAM, the GPU has 12 GB" and "bf16" in skipped
    chosen, skipped = gc.select_shapes(shapes, gpu_count=2, vram_gb=80.0)
    assert [s.name for s in chosen][-1] == "ddp-stall" and not skipped
    chosen, _ = gc.select_shapes(shapes, gpu_count=2, vram_gb=80.0, only=["12G", "ddp-stall"])
    assert [s.name for s in chosen] == ["12G", "ddp-stall"]


def test_command_is_fluxgyms_own_for_the_preset(tmp_path):
    from fluxgym.models import ModelFiles

    models = ModelFiles(None, tmp_path / "dit.safetensors", tmp_path / "clip.safetensors", tmp_path / "t5.safetensors",
                        tmp_path / "ae.sft", tmp_path / "tok", local=True)
    toml, out = tmp_path / "d.toml", tmp_path / "out"
    cmd = gc.command_for(_shape("12G"), models, toml, out)
    script = cmd.index(str(gc.REPO / "sd-scripts" / "flux_train_network.py"))
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--num_processes") + 1] == "1"
    argv = cmd[script + 1:]
    for flag in ("--fp8_base", "--gradient_checkpointing", "--save_state"):
        assert flag in argv
    assert argv[argv.index("--blocks_to_swap") + 1] == "18" and argv[argv.index("--max_train_epochs") + 1] == "1"
    assert argv[argv.index("--mixed_precision") + 1] == "bf16" and argv[argv.index("--output_dir") + 1] == str(out)
    plain = gc.command_for(_shape("bf16"), models, toml, out)
    assert "--fp8_base" not in plain and "--gradient_checkpointing" not in plain
    ddp = gc.command_for(_shape("ddp-stall"), models, toml, out)
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "2"
    assert ddp[ddp.index("--ddp_timeout") + 1] == gc.DDP_TIMEOUT_MIN
    assert _shape("ddp-stall").env == {"FLUXTRAIN_INJECT_HANG": "step@1"}


def _stats(steps=4, seconds=0.25, peak=3 * 2**30):
    return cm.RUN_STATS.format(steps=steps, step_seconds=seconds, peak_bytes=peak)


def test_judge_reads_stats_guards_and_exit():
    done = f"steps: 100%|####| 4/4 [00:01<00:00]\n{_stats()}\nsaving checkpoint: x\n{cm.MODEL_SAVED}\n"
    r = gc.judge(_shape("12G"), 0, done, 42.04)
    assert (r.ok, r.outcome, r.steps, r.step_s, r.peak_vram_gb, r.wall_s) == (True, "ok", 4, 0.25, 3.0, 42.0)
    ddp_line = cm.HANG_GUARD.format(site="ddp", detail="gradient all-reduce: waiting for the other processes")
    r = gc.judge(_shape("ddp-stall"), 1, f"[rank0]: {ddp_line} within 30 s\n", 70)
    assert r.ok and r.outcome == "guard ddp fired (exit 1)" and r.peak_vram_gb is None
    r = gc.judge(_shape("ddp-stall"), 1, "Traceback ...\nRuntimeError: NCCL error\n", 70)
    assert not r.ok and r.outcome == "FAILED: expected guard ddp, got exit 1, guards none"
    r = gc.judge(_shape("8G"), 124, cm.HANG_GUARD.format(site="block_swap", detail="moving block 1") + "\n", 90)
    assert not r.ok and r.outcome == "FAILED: guard block_swap fired (exit 124)"
    r = gc.judge(_shape("bf16"), 1, "loading\ntorch.OutOfMemoryError: CUDA out of memory\nbye\n", 5)
    assert not r.ok and r.outcome == "FAILED: exit 1: torch.OutOfMemoryError: CUDA out of memory"
    launcher = ("torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
                "Traceback (most recent call last):\n  File \"launch.py\", line 999, in simple_launcher\n"
                "subprocess.CalledProcessError: Command '['python3', 'flux_train_network.py']' returned 1.\n")
    r = gc.judge(_shape("bf16"), 1, launcher, 45)  # the rank's error, not accelerate's wrapper
    assert r.outcome == "FAILED: exit 1: torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
    r = gc.judge(_shape("bf16"), 0, "no stats printed\n" + cm.MODEL_SAVED, 5)  # a run that did not report
    assert not r.ok
    r = gc.judge(_shape("bf16"), None, _stats(), 180)
    assert not r.ok and r.outcome == "FAILED: no exit within 180 s (killed)"


def test_table_lines_up_every_column():
    results = [gc.Result("12G", "ok", True, 0, 3.0, 0.25, 4, 42.0),
               gc.Result("ddp-stall", "skipped: needs 2 GPUs, found 1", True)]
    lines = gc.format_table(results).splitlines()
    assert lines[0].split() == ["shape", "peak", "VRAM", "step", "time", "outcome", "wall"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["12G", "3.00", "GiB", "0.250", "s", "ok", "42", "s"]
    assert lines[3].startswith("ddp-stall") and "skipped: needs 2 GPUs" in lines[3]
    column = lines[0].index("outcome")
    assert lines[2][column:].startswith("ok") and lines[3][column:].startswith("skipped")


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(gc, "gpu_inventory", lambda: (0, 0.0, []))
    assert gc.main([]) == gc.EXIT_OK
    assert "no CUDA GPU found" in capsys.readouterr().out
    assert gc.main(["--json"]) == gc.EXIT_OK
    assert json.loads(capsys.readouterr().out)["results"] == []
    with pytest.raises(SystemExit) as info:
        gc.main(["--only", "nope"])
    assert info.value.code == gc.EXIT_USAGE


def test_main_runs_the_selected_shapes_and_fails_on_a_bad_one(monkeypatch, tmp_path, capsys):
    ran = []

    def fake_run(shape, cmd, timeout, out_dir):
        ran.append(shape.name)
        if shape.name == "8G":
            return gc.judge(shape, 1, "RuntimeError: boom\n", 3)
        return gc.judge(shape, 0, f"{_stats()}\n{cm.MODEL_SAVED}\n", 3)

    monkeypatch.setattr(gc, "gpu_inventory", lambda: (1, 16.0, ["Fake GPU 16GB"]))
    monkeypatch.setattr(gc, "_prepare", lambda work: (None, {}))
    monkeypatch.setattr(gc, "_dataset", lambda work, resolution: Path(work) / "d.toml")
    monkeypatch.setattr(gc, "command_for", lambda shape, models, toml, out: ["true"])
    monkeypatch.setattr(gc, "run_shape", fake_run)
    assert gc.main(["--work-dir", str(tmp_path), "--json"]) == gc.EXIT_FAILED
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ran == ["16G", "12G", "8G"]
    outcomes = {r["shape"]: r["outcome"] for r in report["results"]}
    assert outcomes["16G"] == "ok" and outcomes["8G"].startswith("FAILED") and report["ok"] is False
    assert outcomes["ddp-stall"] == "skipped: needs 2 GPUs, found 1"
    assert gc.main(["--work-dir", str(tmp_path), "--only", "16G"]) == gc.EXIT_OK
    assert "16G" in capsys.readouterr().out.splitlines()[-1]
