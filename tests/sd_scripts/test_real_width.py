"""Real FLUX width (hidden 3072, 24 heads, 1 double + 1 single block, ~545M params) through the real loader.

Each load runs in its own process so its peak RSS can be reported: bf16 weights vs fp8 storage.
Also checks our BFL -> diffusers conversion against diffusers' own converter, which only handles 3072.
"""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

pytestmark = pytest.mark.slow

RSS_LIMIT_MB = 4096

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    sys.path[:0] = [sys.argv[3] + "/sd-scripts", sys.argv[3]]
    from library import flux_loading as fl, flux_convert as fc
    from library.flux_packing import image_ids

    path, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    import psutil, accelerate, safetensors.torch
    from diffusers import FluxTransformer2DModel  # import cost must not count as load cost
    rss_before = psutil.Process().memory_info().rss >> 20  # current, not the import-time high-water mark
    t0 = time.monotonic()
    model = fl.load_flow_model(path, dtype=torch.bfloat16, fp8=(mode == "fp8"))
    load_s = time.monotonic() - t0
    load_growth = peak() - rss_before
    # A LoRA-like trainable delta (rank 4) on two Linears, added by forward hooks, as a LoRA network does.
    params = []
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):
        mod = model.get_submodule(name)
        down = torch.nn.Parameter(torch.randn(4, mod.in_features) * 0.01)
        up = torch.nn.Parameter(torch.zeros(mod.out_features, 4))
        params += [down, up]
        mod.register_forward_hook(lambda m, i, o, d=down, u=up: o + (i[0].float() @ d.T @ u.T).to(o.dtype))
    cfg = model.config
    t0 = time.monotonic()
    out = model(hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 16, cfg.joint_attention_dim, dtype=torch.bfloat16),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=torch.bfloat16),
                timestep=torch.full((1,), 0.5), img_ids=image_ids(8, 8), txt_ids=torch.zeros(16, 3),
                guidance=torch.full((1,), 3.5)).sample
    loss = out.float().pow(2).mean()
    loss.backward()
    step_s = time.monotonic() - t0
    result = {"mode": mode, "load_s": round(load_s, 2), "step_s": round(step_s, 2),
              "loss": float(loss), "up_grads": [float(p.grad.abs().sum()) for p in params[1::2]],
              "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
              "num_params": sum(p.numel() for p in model.parameters()),
              "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) >> 20,
              "rss_before_load_mb": rss_before, "load_peak_growth_mb": load_growth, "peak_rss_mb": peak()}
    if mode == "bf16":
        # Independent check against diffusers' converter (hard-wired to width 3072).
        from safetensors.torch import load_file
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
        own = {k: v for k, v in model.state_dict().items()}
        del model, out, loss
        stock = convert_flux_transformer_checkpoint_to_diffusers(load_file(path))
        result["stock_keys_equal"] = set(stock) == set(own)
        result["stock_tensors_equal"] = all(torch.equal(stock[k], own[k]) for k in own if k in stock)
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    from fluxgym.tiny_flux import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("real_models"), seed=0, width="real")


def _run(venv_python, repo_root, path, mode) -> dict:
    proc = subprocess.run([venv_python, "-c", _SCRIPT, str(path), mode, str(repo_root)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_real_width_loads_trains_and_matches_stock_converter(real_files, venv_python, repo_root):
    from library.flux_loading import analyze_flux_checkpoint

    info = analyze_flux_checkpoint(real_files["unet"])
    assert (info.hidden_size, info.num_heads, info.head_dim) == (3072, 24, 128)
    assert info.axes_dims_rope == (16, 56, 56) and (info.context_dim, info.vec_dim) == (4096, 768)

    bf16 = _run(venv_python, repo_root, real_files["unet"], "bf16")
    fp8 = _run(venv_python, repo_root, real_files["unet"], "fp8")
    print(f"\nreal-width 1+1 blocks: bf16 {bf16}\n                       fp8  {fp8}")
    assert 500e6 < bf16["num_params"] < 600e6
    assert bf16["stock_keys_equal"] and bf16["stock_tensors_equal"]
    for r in (bf16, fp8):
        assert all(g > 0 for g in r["up_grads"]), r
        assert r["peak_rss_mb"] < RSS_LIMIT_MB, r
    assert bf16["param_dtypes"] == ["torch.bfloat16"]
    assert fp8["param_dtypes"] == ["torch.bfloat16", "torch.float8_e4m3fn"]
    # Block Linears (modulation included) are stored in fp8; only embedders/final layer stay bf16.
    assert fp8["weights_mb"] < 0.75 * bf16["weights_mb"]
    # fp8 conversion streams the file: loading costs about the fp8 weights, never the bf16 copy.
    assert fp8["load_peak_growth_mb"] < bf16["weights_mb"]
