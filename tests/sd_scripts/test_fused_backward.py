"""--fused_backward_pass (library.fused_backward) and the Lion optimizer.

Optimizer-level checks on a small module: fused steps equal ordinary steps, each tensor is clipped alone
(values written from the clip formula), accumulation steps once per two micro-steps, and Lion's update is
checked against its formula. One tiny end-to-end run pair: a fused run interrupted and resumed ends with
the same LoRA as an ordinary uninterrupted run.
"""
from __future__ import annotations

import pytest
import torch

import flux_train_network
from library.fused_backward import FusedBackward, check_fused_backward
from library.settings import SettingsError, settings_from_args

BASE = ["--pretrained_model_name_or_path", "/m/f.sft", "--clip_l", "/m/c.sft", "--t5xxl", "/m/t.sft",
        "--ae", "/m/a.sft", "--dataset_config", "d.toml", "--seed", "1"]


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def make_optimizer(kind: str, model: torch.nn.Module):
    # two groups with different LRs, as the LoRA network's text-encoder / transformer groups
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2}, {"params": list(model[2].parameters()), "lr": 3e-3}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, weight_decay=0.1)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    if kind == "lion":
        import lion_pytorch

        return lion_pytorch.Lion(groups, weight_decay=0.1)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def loss_of(model, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


@pytest.mark.parametrize("kind, dtype", [("adamw", torch.float32), ("sgd", torch.float32), ("lion", torch.float32),
                                         ("adafactor", torch.float32), ("adamw", torch.bfloat16)])
def test_fused_steps_equal_ordinary_steps(kind, dtype):
    """bf16 parameters (hence gradients and AdamW state) are what --full_bf16 gives the LoRA."""
    plain, fused_model = small_model().to(dtype), small_model().to(dtype)
    plain_opt, fused_opt = make_optimizer(kind, plain), make_optimizer(kind, fused_model)
    fused = FusedBackward(fused_opt, list(fused_model.parameters()), max_grad_norm=0.0)
    for step in range(3):
        loss_of(plain, step).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        loss_of(fused_model, step).backward()
        assert all(p.grad is None for p in fused_model.parameters())  # freed in the hook, right after its step
        assert fused.end_step() == 4
    assert fused.optimizer_steps == 3 and fused.parameter_steps == 12
    for a, b in zip(plain.parameters(), fused_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert all(len(g["params"]) == 2 for g in fused_opt.param_groups)  # the groups are restored after each step
    fused.remove()


def test_each_tensor_is_clipped_alone():
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w, b], lr=1.0)
    FusedBackward(opt, [w, b], max_grad_norm=1.0)
    g_w, g_b = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    ((w * g_w).sum() + (b * g_b).sum()).backward()
    # clip_grad_norm_ per tensor: g * min(1, max_norm / (||g|| + 1e-6)); SGD with lr 1: p = 0 - g
    assert torch.allclose(w.detach(), -g_w * (1.0 / (5.0 + 1e-6)), rtol=0, atol=1e-7)
    assert torch.equal(b.detach(), -g_b)  # below the bound: untouched
    # global-norm clipping (the ordinary path) would have scaled b too
    global_scale = 1.0 / ((25.0 + 0.25) ** 0.5 + 1e-6)
    assert not torch.allclose(b.detach(), -g_b * global_scale)


def test_accumulation_steps_once_per_two_micro_steps():
    plain, fused_model = small_model(), small_model()
    plain_opt, fused_opt = make_optimizer("adamw", plain), make_optimizer("adamw", fused_model)
    sync = {"now": False}
    fused = FusedBackward(fused_opt, list(fused_model.parameters()), max_grad_norm=0.0, should_step=lambda: sync["now"])
    before = [p.detach().clone() for p in fused_model.parameters()]
    for micro in range(4):
        sync["now"] = micro % 2 == 1  # accelerate's sync_gradients: True on every second micro-step
        loss_of(fused_model, micro).backward()
        fused.end_step()
        loss_of(plain, micro).backward()
        if micro % 2 == 1:
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        if micro == 0:  # first micro-step: nothing stepped, the gradient is kept for the next one
            assert all(torch.equal(p, q) for p, q in zip(fused_model.parameters(), before))
            assert all(p.grad is not None for p in fused_model.parameters())
    assert fused.optimizer_steps == 2 and fused.parameter_steps == 8
    assert all(fused_opt.state[p]["step"] == 2 for p in fused_model.parameters())
    for a, b in zip(plain.parameters(), fused_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_lion_step_follows_its_formula():
    import lion_pytorch

    p0, g = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.2, -0.1, -0.4, 0.0])
    lr, wd, beta1, beta2 = 0.1, 0.01, 0.9, 0.99
    p = torch.nn.Parameter(p0.clone())
    opt = lion_pytorch.Lion([p], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    m0 = torch.tensor([0.5, 0.5, -1.0, -0.3])
    opt.state[p]["exp_avg"] = m0.clone()
    p.grad = g.clone()
    opt.step()
    # Lion: p <- p * (1 - lr * wd) - lr * sign(beta1 * m + (1 - beta1) * g);  m <- beta2 * m + (1 - beta2) * g
    # beta1*m + (1-beta1)*g = [0.47, 0.44, -0.94, -0.27] -> signs [+, +, -, -]
    expected = p0 * (1 - lr * wd) - lr * torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7)
    assert torch.allclose(opt.state[p]["exp_avg"], beta2 * m0 + (1 - beta2) * g, rtol=0, atol=1e-7)


def settings(tmp_path, *extra):
    ns = flux_train_network.setup_parser().parse_args(BASE + ["--output_dir", str(tmp_path), *extra])
    return settings_from_args(ns)


def test_settings_accept_per_parameter_optimizers_and_refuse_the_others(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert settings(tmp_path, "--fused_backward_pass").optimizer.fused_backward_pass
    for kind in ("Adafactor", "AdamW8bit", "torch.optim.SGD"):
        assert settings(tmp_path, "--fused_backward_pass", "--optimizer_type", kind).optimizer.fused_backward_pass
    assert settings(tmp_path, "--fused_backward_pass", "--use_lion_optimizer").optimizer.type == "Lion"
    for kind in ("prodigyopt.Prodigy", "dadaptation.DAdaptAdam", "schedulefree.AdamWScheduleFree"):
        with pytest.raises(SettingsError, match=f"--fused_backward_pass with --optimizer_type {kind}"):
            check_fused_backward(kind, "no", 1)
    with pytest.raises(SettingsError, match="--fused_backward_pass with --mixed_precision fp16"):
        settings(tmp_path, "--fused_backward_pass", "--mixed_precision", "fp16")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SettingsError, match="--fused_backward_pass with 2 processes"):
        settings(tmp_path, "--fused_backward_pass")


def test_refused_optimizer_exits_2_naming_both_flags(tmp_path, capsys):
    code = flux_train_network.main(BASE + ["--output_dir", str(tmp_path), "--fused_backward_pass",
                                           "--optimizer_type", "prodigyopt.Prodigy"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--fused_backward_pass" in err and "--optimizer_type prodigyopt.Prodigy" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_fused_run_interrupted_and_resumed_equals_an_ordinary_run(tiny_models, tmp_path, monkeypatch, capsys):
    """AdamW, --max_grad_norm 0: per-parameter steps in backward (with gradient checkpointing and block swap)
    through a kill after step 2 and --resume auto end bit-identical to an ordinary uninterrupted run."""
    from safetensors.torch import load_file

    from train_helpers import make_dataset, run_trainer, run_trainer_in_process, trainer_args

    _, toml = make_dataset(tmp_path / "data", count=3, size=64)  # 3 batches an epoch: the resume is mid-epoch

    def args(out, *extra):
        return trainer_args(tiny_models, toml, tmp_path / out, "--max_train_steps", "4", "--max_grad_norm", "0", *extra)

    assert run_trainer_in_process(args("plain")) == 0
    fused = args("fused", "--fused_backward_pass", "--gradient_checkpointing", "--blocks_to_swap", "1",
                 "--save_every_n_steps", "1", "--save_state")
    losses = tmp_path / "fused-loss.csv"
    first = run_trainer(fused, env={"FLUXTRAIN_EXIT_AFTER_STEP": "2", "FLUXTRAIN_LOSS_LOG": str(losses)})
    assert first.returncode == 75, first.stderr[-3000:]
    assert "fused backward pass: 76 LoRA tensors" in first.stdout
    monkeypatch.setenv("FLUXTRAIN_LOSS_LOG", str(losses))
    capsys.readouterr()
    assert run_trainer_in_process(fused + ["--resume", "auto"]) == 0  # in this process: no second start-up
    assert "resumed from" in capsys.readouterr().out
    assert [line.split(",")[0] for line in losses.read_text().splitlines()] == ["1", "2", "3", "4"]
    plain = load_file(str(tmp_path / "plain" / "tiny.safetensors"))
    chain = load_file(str(tmp_path / "fused" / "tiny.safetensors"))
    assert plain.keys() == chain.keys()
    initial = load_file(str(tmp_path / "fused" / "tiny-step00000001.safetensors"))
    assert any(not torch.equal(chain[k], initial[k]) for k in chain)  # the fused steps did train
    for key in plain:
        assert torch.equal(plain[key], chain[key]), key
