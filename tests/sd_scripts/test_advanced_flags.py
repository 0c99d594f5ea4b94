"""Precision, schedule and continuation flags: each one's effect (a dtype, a rank, a file, a tensor, an LR).

One real run (bf16 with --full_bf16, --dim_from_weights, --initial_step with --skip_until_initial_step,
--save_n_epoch_ratio, --xformers, the --ddp_* flags) is shared; the rest are checks against upstream's formulas on fixed
tensors and settings errors, which need no model.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import flux_train_network
from library.settings import SettingsError, settings_from_args
from train_helpers import make_dataset, run_trainer, trainer_args

BASE = ["--pretrained_model_name_or_path", "/m/f.sft", "--clip_l", "/m/c.sft", "--t5xxl", "/m/t.sft", "--ae", "/m/a.sft",
        "--dataset_config", "d.toml", "--seed", "1"]


def settings(tmp_path, *extra):
    ns = flux_train_network.setup_parser().parse_args(BASE + ["--output_dir", str(tmp_path), *extra])
    return settings_from_args(ns)


def lora_file(tmp_path, name: str, rank: int, alpha: float, models) -> str:
    """A LoRA file for the tiny transformer with non-zero up weights (so merging it changes the model)."""
    from safetensors.torch import save_file

    from library import flux_loading
    from networks import lora_flux

    flux = flux_loading.load_flow_model(str(models["unet"]), dtype=torch.float32, device="cpu")
    net = lora_flux.create_network(1.0, rank, alpha, None, None, flux)
    torch.manual_seed(3)
    with torch.no_grad():
        for module in net.lora_modules():
            module.lora_up.weight.normal_(0, 0.02)
    path = tmp_path / name
    save_file(net.kohya_state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def bf16_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("advanced")
    _, toml = make_dataset(root / "data", count=3)
    weights = lora_file(root, "init.safetensors", rank=2, alpha=2.0, models=tiny_models)
    args = trainer_args(tiny_models, toml, root / "out", "--max_train_steps", "5", "--full_bf16", "--xformers",
                        "--mem_eff_attn", "--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--network_weights", weights, "--dim_from_weights", "--network_dim", "8",
                        "--initial_step", "2", "--skip_until_initial_step", "--save_n_epoch_ratio", "2",
                        "--logging_dir", str(root / "logs"), "--lr_scheduler", "linear")
    args[args.index("--mixed_precision") + 1] = "bf16"
    proc = run_trainer(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "proc": proc}


def test_full_bf16_dim_from_weights_and_attention_flags(bf16_run):
    from safetensors import safe_open

    with safe_open(str(bf16_run["root"] / "out" / "tiny.safetensors"), framework="pt") as handle:
        downs = [handle.get_tensor(k) for k in handle.keys() if k.endswith(".lora_down.weight")]
        alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}
    assert downs and {t.dtype for t in downs} == {torch.bfloat16}  # trained and saved in bf16 (no --save_precision)
    assert {t.shape[0] for t in downs} == {2} and alphas == {2.0}  # rank/alpha of the file, not --network_dim 8
    err = bf16_run["proc"].stderr
    assert err.count("FLUX attention always uses torch SDPA") == 1  # --xformers and --mem_eff_attn: one warning
    for flag in ("--ddp_gradient_as_bucket_view", "--ddp_static_graph"):  # accepted, one warning each saying why
        assert err.count(f"{flag}: accepted, no effect: there is no DDP wrapper here") == 1


def test_initial_step_and_save_n_epoch_ratio(bf16_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, out = bf16_run["root"], bf16_run["proc"].stdout
    assert "starting at step 2 (epoch 1, batch 2)" in out
    (folder,) = list((root / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    lrs = {e.step: e.value for e in acc.Scalars("lr/unet")}
    assert sorted(lrs) == [3, 4, 5]  # steps 3..5 trained, numbered absolutely
    # upstream: a manual restart starts the LR schedule afresh: after k steps linear gives LR * (1 - k / 5)
    assert lrs == pytest.approx({2 + k: 1e-3 * (1 - k / 5) for k in (1, 2, 3)}, rel=1e-6)
    # 2 epochs / ratio 2 -> every epoch; epoch 1 ends at step 3, the last epoch gets the final file (upstream)
    names = sorted(p.name for p in (root / "out").glob("*.safetensors"))
    assert names == ["tiny-000001.safetensors", "tiny.safetensors"]


def test_base_weights_merge_matches_the_lora_formula(tiny_models, tmp_path):
    from library import continuation, flux_loading
    from library.settings import ContinuationSettings
    from networks import lora_flux

    path = lora_file(tmp_path, "base.safetensors", rank=4, alpha=2.0, models=tiny_models)
    flux = flux_loading.load_flow_model(str(tiny_models["unet"]), dtype=torch.float32, device="cpu")
    probe = lora_flux.create_network_from_weights(1.0, path, None, None, flux)[0]
    name = probe.unet_module_names[0]
    target = probe._targets[name][0]
    before = target.module.weight.detach().clone()
    from safetensors.torch import load_file

    sd = load_file(path)
    up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
    session = SimpleNamespace(models=SimpleNamespace(transformer=flux, clip_l=None),
                              settings=SimpleNamespace(continuation=ContinuationSettings(
                                  base_weights=(path,), base_weights_multipliers=(0.5,))))
    continuation.merge_base_weights(session)
    # W' = W + multiplier * alpha / rank * up @ down (rows of this diffusers Linear)
    expected = before + 0.5 * (2.0 / 4) * (up @ down)[target.row_start:target.row_end]
    assert torch.allclose(target.module.weight, expected, atol=1e-6)
    assert not torch.equal(target.module.weight, before)


def test_torch_compile_eager_gives_the_same_output(tiny_models):
    import torch._dynamo

    from library import flux_loading, precision

    flux = flux_loading.load_flow_model(str(tiny_models["unet"]), dtype=torch.float32, device="cpu")
    block = flux.single_transformer_blocks[0]
    dim = block.norm.linear.in_features
    torch.manual_seed(0)
    hidden, text, temb = torch.randn(1, 8, dim), torch.randn(1, 4, dim), torch.randn(1, dim)
    head = dim // flux.config.num_attention_heads
    rotary = (torch.ones(12, head), torch.zeros(12, head))
    plain = block(hidden, text, temb, image_rotary_emb=rotary)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert precision.compile_blocks(flux, "eager") == len(flux.transformer_blocks) + len(flux.single_transformer_blocks)
    compiled = block(hidden, text, temb, image_rotary_emb=rotary)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo really traced the block
    for x, y in zip(plain if isinstance(plain, tuple) else (plain,), compiled if isinstance(compiled, tuple)
                    else (compiled,)):
        assert torch.allclose(x, y, atol=1e-5)


def test_scheduler_formulas(tmp_path):
    from library import optim

    def lrs(*extra, steps=6, total=6):
        s = settings(tmp_path, "--learning_rate", "1.0", *extra).optimizer
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = optim.create_scheduler(s, opt, total)
        values = []
        for _ in range(steps):
            opt.step()
            sched.step()
            values.append(opt.param_groups[0]["lr"])
        return values

    # --lr_scheduler_type StepLR with --lr_scheduler_args: 1.0 * gamma ** (k // step_size)
    assert lrs("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5") == \
        pytest.approx([0.5 ** (k // 2) for k in range(1, 7)])
    # inverse_sqrt with --lr_scheduler_timescale T and warmup W: sqrt(T) / sqrt(k + T - W)... after warmup
    t, w = 4, 2
    expected = [k / w if k < w else 1 / math.sqrt((k + (t - w)) / t) for k in range(1, 7)]
    assert lrs("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", str(w), "--lr_scheduler_timescale", str(t)) == \
        pytest.approx(expected)
    # warmup_stable_decay, no warmup, 2 decay steps of 6, floor --lr_scheduler_min_lr_ratio 0.2 (cosine decay)
    r = 0.2
    decay = [r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)) for p in (1 / 2, 1.0)]
    assert lrs("--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "2", "--lr_scheduler_min_lr_ratio",
               str(r)) == pytest.approx([1, 1, 1, 1] + decay)


def test_optimizer_shortcuts_map_as_upstream(tmp_path):
    assert settings(tmp_path, "--use_8bit_adam").optimizer.type == "AdamW8bit"
    with pytest.raises(SettingsError, match="--use_8bit_adam and --optimizer_type"):
        settings(tmp_path, "--use_8bit_adam", "--optimizer_type", "adamw")
    with pytest.raises(SettingsError, match="--use_8bit_adam and --use_lion_optimizer"):
        settings(tmp_path, "--use_8bit_adam", "--use_lion_optimizer")
    try:
        import lion_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(SettingsError, match="lion-pytorch"):
            settings(tmp_path, "--use_lion_optimizer")
    else:
        assert settings(tmp_path, "--use_lion_optimizer").optimizer.type == "Lion"


@pytest.mark.parametrize("extra, flag", [
    (["--full_bf16"], "--full_bf16 needs --mixed_precision bf16"),
    (["--full_fp16", "--mixed_precision", "bf16"], "--full_fp16 needs --mixed_precision fp16"),
    (["--cpu_offload_checkpointing", "--blocks_to_swap", "2"], "--cpu_offload_checkpointing"),
    (["--torch_compile", "--dynamo_backend", "fx2trt"], "--dynamo_backend fx2trt"),
    (["--log_with", "tensorboard"], "--log_with tensorboard needs --logging_dir"),
    (["--validation_split", "1.0"], "--validation_split"),
    (["--validate_every_n_steps", "0"], "--validate_every_n_steps"),
    (["--dim_from_weights"], "--dim_from_weights needs --network_weights"),
    (["--base_weights", "/no/such.safetensors"], "--base_weights"),
    (["--lr_scheduler_args", "oops"], "--lr_scheduler_args"),
    (["--log_tracker_config", "/no/such.toml"], "--log_tracker_config"),
])
def test_bad_values_name_the_flag_before_models_load(extra, flag, tmp_path):
    with pytest.raises(SettingsError, match=flag):
        settings(tmp_path, *extra)


def test_wandb_is_optional_with_a_clear_error_and_gets_upstream_keys(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from library.settings import TrackingSettings
    from library.tracking import Tracker

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(SettingsError, match="wandb package"):
            settings(tmp_path, "--log_with", "wandb")
    logged = []

    class FakeRun:
        def define_metric(self, *a, **k):
            pass

        def log(self, values):
            logged.append(values)

        def finish(self):
            logged.append("finished")

    fake = SimpleNamespace(init=lambda **kwargs: logged.append(kwargs) or FakeRun(), login=lambda key: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = Tracker(TrackingSettings(log_with=("wandb",), tracker_config={"wandb": {"name": "r1"}}),
                      is_main=True, raw_flags={"wandb_api_key": "k", "seed": 1})
    tracker.log({"loss/current": 0.5}, step=7, epoch=2)
    tracker.close()
    assert logged[0]["project"] == "network_train" and logged[0]["name"] == "r1" and logged[0]["config"] is None
    assert logged[1] == {"loss/current": 0.5, "global_step": 7, "epoch": 2} and logged[2] == "finished"


def test_validation_split_and_timesteps_follow_upstream(tmp_path):
    import random
    from pathlib import Path

    from library.dataset import ImageItem
    from library.validation import split_indices, validation_timesteps

    assert validation_timesteps() == [200, 400, 600, 800]  # linspace(0, 1000, 6)[1:-1]
    items = [ImageItem(Path(f"/d/a/img{i}.png"), "c", (64, 64), (64, 64), False, 1) for i in range(8)]
    train, held = split_indices(items, 0.25, seed=5)
    order = list(range(8))
    random.Random(5).shuffle(order)
    assert held == sorted(order[math.ceil(8 * 0.75):]) and train == sorted(order[:6])
    assert split_indices(items, 0.25, seed=5) == (train, held)
    assert split_indices(items, 0.25, seed=6)[1] != held


def test_refused_flags_all_give_a_reason():
    from library import args

    parser = flux_train_network.setup_parser()
    refused = [a for a in parser._actions if isinstance(a, args.UnsupportedFlag)]
    assert len(refused) == len(args.UNSUPPORTED_FLAGS) == 24  # 106 before issue 14; 32 before this round
    assert all(a.reason for a in refused)
    assert "SD1/SDXL only" in args.UNSUPPORTED_FLAGS["--clip_skip"]


def test_cpu_offload_checkpointing_context_keeps_gradients(tmp_path):
    """The offload hooks are active exactly when asked for, and a backward through them is unchanged.
    (On a CPU-only machine nothing moves; the GPU check counts offloaded bytes in precision.OFFLOAD_STATS.)"""
    import contextlib

    from library import precision

    def session(*extra):
        return SimpleNamespace(settings=settings(tmp_path, *extra))

    assert isinstance(precision.activation_offload(session("--cpu_offload_checkpointing")), contextlib.nullcontext)
    active = precision.activation_offload(session("--cpu_offload_checkpointing", "--gradient_checkpointing"))
    assert isinstance(active, torch.autograd.graph.saved_tensors_hooks)
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 4), torch.randn(3, 4)
    plain = torch.autograd.grad(torch.tanh(layer(x)).sum(), layer.weight)[0]
    with active:
        offloaded = torch.autograd.grad(torch.tanh(layer(x)).sum(), layer.weight)[0]
    assert torch.equal(plain, offloaded)
