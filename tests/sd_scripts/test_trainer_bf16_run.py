"""One real training run in process (bf16, sampling, state save, run stats), read by several tests:
the float32 conditioning values that reach FLUX's embeddings, and the console lines the supervisor
parses. One run keeps the cost of both checks to a few seconds."""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from library import console_markers as cm
from library import flux_loading
from test_flux_time_inputs import record_time_proj
from train_helpers import make_dataset, marker_groups, run_trainer_in_process, trainer_args


@dataclass
class Run:
    exit_code: int
    out: str
    err: str
    output_dir: Path
    time_proj_inputs: list  # what reached time_text_embed.time_proj: (timestep, guidance) per forward
    timestep_dtypes: list   # dtype of the `timestep` the callers passed to the transformer


@pytest.fixture(scope="module")
def bf16_run(tiny_models, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("bf16run")
    loaded, dtypes = [], []
    original = flux_loading.load_flow_model

    def recording_loader(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(record_time_proj(model))
        model.register_forward_pre_hook(lambda m, a, kw: dtypes.append(kw["timestep"].dtype), with_kwargs=True)
        return model

    _, toml = make_dataset(root / "data", count=1)
    prompts = root / "prompts.txt"
    prompts.write_text("tok a picture --w 64 --h 64 --s 2 --d 1 --g 3.5\n", encoding="utf-8")
    out = root / "out"
    # One step: the first sample (2 denoising steps), caching, one epoch line, the final save with state.
    args = trainer_args(tiny_models, toml, out, "--max_train_steps", "1", "--save_state",
                        "--sample_prompts", str(prompts), "--sample_at_first")
    args[args.index("--mixed_precision") + 1] = "bf16"
    args[args.index("--guidance_scale") + 1] = "3.5"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flux_loading, "load_flow_model", recording_loader)
        mp.setenv("FLUXTRAIN_RUN_STATS", "1")  # the opt-in line tools/gpu_check.py reads
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run_trainer_in_process(args)
    (seen,) = loaded
    return Run(code, stdout.getvalue(), stderr.getvalue(), out, seen, dtypes)


def test_training_and_sampling_under_bf16_reach_the_embedding_in_float32(bf16_run):
    """Every guidance value is 3500.0 and every timestep a float32 value, in the sample and the training step."""
    assert bf16_run.exit_code == 0, bf16_run.err[-3000:]
    timesteps, guidance = bf16_run.time_proj_inputs[0::2], bf16_run.time_proj_inputs[1::2]
    assert len(timesteps) == 2 + 1  # two sampling steps, then one training step
    assert all(g.dtype == torch.float32 and g.tolist() == [3500.0] for g in guidance)
    # The callers pass t itself in float32, so nothing is rounded before the x1000 either.
    assert bf16_run.timestep_dtypes == [torch.float32] * 3 and all(t.dtype == torch.float32 for t in timesteps)
    # The training step's random timestep: a bf16 round trip would change it.
    assert not torch.equal(timesteps[-1], timesteps[-1].bfloat16().float())


def test_the_run_prints_every_marker_the_supervisor_reads(bf16_run):
    assert bf16_run.exit_code == 0, bf16_run.err[-3000:]
    out, err = bf16_run.out, bf16_run.err
    found = marker_groups(out + err)
    assert found["ep"] == ["1"]
    assert "steps" in found["desc"]
    assert set(found["saving"]) == {"saving checkpoint", "saving state", "saving last state"}
    assert found["caching_latents"] and found["caching_text"] and found["sampling"]
    assert found["done"] == ["model saved."]
    # "saving checkpoint: PATH" and "saving state at ..." name what was written
    saved = re.findall(r"^saving checkpoint: (.+)$", out, re.M)
    outdir = bf16_run.output_dir
    assert saved == [str(p) for p in outdir.glob("*.safetensors")] == [str(outdir / "tiny.safetensors")]
    assert cm.SAVING_STATE.format(what="epoch 1") in out and (outdir / "tiny-state").is_dir()
    assert cm.GENERATING_SAMPLES.format(step=0) in out
    stats = cm.RUN_STATS_RE.search(out)
    assert stats and stats.group("steps") == "1" and stats.group("peak_bytes") == "0"  # CPU: no CUDA peak
    bars = [m for m in cm.OPEN_BAR.finditer(err) if m.group("desc") == cm.STEPS_BAR_DESC]
    assert bars and bars[-1].group("n") == bars[-1].group("m") == "1"
