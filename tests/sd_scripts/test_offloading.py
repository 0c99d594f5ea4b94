"""Block swap on a tiny diffusers FLUX transformer: bit-identical results, real offloaded state, bounded waits.

On CPU the moves are identities, so the swapper runs with `poison_offloaded=True`: a parked block's
weights read as NaN, and any forward or backward that used a block that was not brought in would
show up as NaN or a mismatch.
"""
from __future__ import annotations

import contextlib
import copy
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from library.offloading import BlockSwapper, BlockSwapTimeout, split_blocks_to_swap

CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6))  # hidden 64


@pytest.fixture(scope="module")
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():  # diffusers zero-inits some output layers; noise makes every block matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def make_inputs(input_grad: bool):
    g = torch.Generator().manual_seed(1)
    b, n_img, n_txt = 2, 16, 8
    return dict(
        hidden_states=torch.randn(b, n_img, 16, generator=g).requires_grad_(input_grad),
        encoder_hidden_states=torch.randn(b, n_txt, 32, generator=g),
        pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
        img_ids=torch.randn(n_img, 3, generator=g), txt_ids=torch.zeros(n_txt, 3), guidance=torch.tensor([3.5, 3.5]),
    )


def train_step(model, *, checkpointing: bool, frozen: bool):
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.requires_grad_(not frozen)
    model.zero_grad(set_to_none=True)
    x = make_inputs(input_grad=True)
    out = model(**x, return_dict=False)[0]
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x["hidden_states"].grad.clone(), grads


def attach_lora_standin(model) -> torch.nn.ModuleList:
    """Like networks.lora_flux: adapters owned outside the blocks, added by forward hooks on block Linears."""
    torch.manual_seed(5)
    targets = [b.attn.to_q for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    adapters = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(64, 4, bias=False),
                                                       torch.nn.Linear(4, 64, bias=False)) for _ in targets)
    for lin, ad in zip(targets, adapters):
        lin.register_forward_hook(lambda m, args, out, ad=ad: out + ad(args[0]))
    return adapters


def lora_step(model, adapters, *, checkpointing: bool):
    model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    adapters.zero_grad(set_to_none=True)
    x = make_inputs(input_grad=False)  # as in LoRA training: only the adapters need gradients
    out = model(**x, return_dict=False)[0]
    (out.float() ** 2).mean().backward()
    return out.detach(), [p.grad.clone() for p in adapters.parameters()]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
def test_lora_style_training_identical_with_swap(tiny_flux, checkpointing):
    ref_model = copy.deepcopy(tiny_flux)
    ref_out, ref_grads = lora_step(ref_model, attach_lora_standin(ref_model), checkpointing=checkpointing)
    model = copy.deepcopy(tiny_flux)
    adapters = attach_lora_standin(model)
    swapper = BlockSwapper(model, 2, "cpu", timeout=10, on_timeout=no_timeout, poison_offloaded=True)
    try:
        for _ in range(2):
            out, grads = lora_step(model, adapters, checkpointing=checkpointing)
            assert torch.equal(out, ref_out)
            assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
            assert all(g.abs().sum() > 0 for g in grads)  # every adapter, swapped blocks' included, got gradient
    finally:
        swapper.close()


def no_timeout(detail):
    raise AssertionError(f"unexpected swap timeout: {detail}")


def parked(block) -> bool:
    return all(torch.isnan(p).all() for p in block.parameters())


def test_split_matches_upstream_counting():
    assert split_blocks_to_swap(18, 19, 38) == (9, 18)  # what --split_mode injects upstream
    assert split_blocks_to_swap(35, 19, 38) == (17, 36)
    assert split_blocks_to_swap(1, 19, 38) == (0, 2)
    assert split_blocks_to_swap(0, 19, 38) == (0, 0)
    assert split_blocks_to_swap(3, 2, 2) == (1, 2)  # clamped to the model's blocks
    with pytest.raises(ValueError, match="--blocks_to_swap"):
        split_blocks_to_swap(-1, 19, 38)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_base", "all_trainable"])
def test_swapping_gives_identical_outputs_and_gradients(tiny_flux, checkpointing, frozen):
    ref_out, ref_gx, ref_grads = train_step(copy.deepcopy(tiny_flux), checkpointing=checkpointing, frozen=frozen)
    model = copy.deepcopy(tiny_flux)
    swapper = BlockSwapper(model, 3, "cpu", timeout=10, on_timeout=no_timeout, poison_offloaded=True)
    try:
        assert swapper.swapped == (1, 2, 3)  # last double block + both single blocks
        assert not parked(model.transformer_blocks[0]) and parked(model.transformer_blocks[1])
        for _ in range(2):  # the second step starts from the layout the first one left
            out, gx, grads = train_step(model, checkpointing=checkpointing, frozen=frozen)
            assert torch.equal(out, ref_out)
            assert torch.equal(gx, ref_gx)
            assert grads.keys() == ref_grads.keys()
            for name, g in grads.items():
                assert torch.equal(g, ref_grads[name]), name
        swapper.prepare_block_devices_before_forward()
        assert all(parked(swapper.blocks[i]) for i in swapper.swapped)
    finally:
        swapper.close()


def test_no_grad_forward_and_resting_layout(tiny_flux):
    model = copy.deepcopy(tiny_flux).eval()
    with torch.no_grad():
        ref = model(**make_inputs(False), return_dict=False)[0]
    swapper = BlockSwapper(model, 2, "cpu", timeout=10, on_timeout=no_timeout, poison_offloaded=True)
    try:
        for _ in range(3):  # a denoising loop: forward after forward, no backward
            with torch.no_grad():
                assert torch.equal(model(**make_inputs(False), return_dict=False)[0], ref)
        swapper.prepare_block_devices_before_forward()
        assert [i for i in range(4) if parked(swapper.blocks[i])] == [1, 2, 3]
    finally:
        swapper.close()
    assert not model.transformer_blocks[1]._forward_pre_hooks  # close() removed the hooks


def test_backward_scheduling_is_what_makes_it_correct(tiny_flux, monkeypatch):
    """Sabotage: without bringing blocks back for backward, the parked NaN weights leak into gradients."""
    model = copy.deepcopy(tiny_flux)
    swapper = BlockSwapper(model, 3, "cpu", timeout=10, on_timeout=no_timeout, poison_offloaded=True)
    monkeypatch.setattr(swapper, "_on_backward_start", lambda i: None)
    try:
        _, gx, _ = train_step(model, checkpointing=False, frozen=True)
        assert torch.isnan(gx).any()
    finally:
        swapper.close()


def test_zero_blocks_is_a_no_op(tiny_flux):
    model = copy.deepcopy(tiny_flux)
    swapper = BlockSwapper(model, 0, "cpu", timeout=10, on_timeout=no_timeout)
    assert swapper.swapped == () and not model._forward_pre_hooks
    swapper.close()


def test_timeout_calls_on_timeout_in_bound(tiny_flux):
    """A move that never finishes: the wait gives up after `timeout` and reports which block."""
    import threading

    model = copy.deepcopy(tiny_flux)
    calls = []
    swapper = BlockSwapper(model, 2, "cpu", timeout=1.0, on_timeout=calls.append)
    release = threading.Event()
    real_job = swapper._job_in
    swapper._job_in = lambda i: (release.wait(30), real_job(i))[1]  # a stuck host-to-device copy
    try:
        t0 = time.monotonic()
        with pytest.raises(BlockSwapTimeout, match="transformer_blocks.1 to cpu did not finish within 1 s"):
            with torch.no_grad():
                model(**make_inputs(False), return_dict=False)
        assert 0.9 < time.monotonic() - t0 < 1.0 + 2.0
        assert len(calls) == 1 and "transformer_blocks.1" in calls[0]
    finally:
        release.set()
        swapper._job_in = real_job
        swapper.close()


def test_injected_block_swap_hang_exits_124_via_hang_guard(tmp_path, venv_python, repo_root):
    """FLUXTRAIN_INJECT_HANG=block_swap with the real exit path: on_timeout -> HangGuards.fire -> 124."""
    script = tmp_path / "swap_hang.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(repo_root / 'sd-scripts')!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from diffusers import FluxTransformer2DModel
        from library.hang_guards import HangGuards
        from library.heartbeat import Heartbeat
        from library.offloading import BlockSwapper
        from test_offloading import CONFIG, make_inputs
        out = sys.argv[1]
        hb = Heartbeat(out); hb.phase("training"); hb.step(4, 1)
        guards = HangGuards(out, hb, stall_dump_timeout=0)
        model = FluxTransformer2DModel(**CONFIG)
        t0 = None
        def on_timeout(detail):
            print(f"on_timeout after {{time.monotonic() - t0:.2f}} s", flush=True)
            guards.fire("block_swap", detail)
        swapper = BlockSwapper(model, 2, "cpu", timeout=1.0, on_timeout=on_timeout)
        os.environ["FLUXTRAIN_INJECT_HANG"] = "block_swap"  # the next move blocks forever in the worker
        t0 = time.monotonic()
        model(**make_inputs(True), return_dict=False)
        print("not reached")
    """))
    r = subprocess.run([venv_python, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 124, r.stdout + r.stderr
    elapsed = float(r.stdout.split("on_timeout after ")[1].split()[0])
    assert 0.9 < elapsed < 1.0 + 2.0
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("HANG GUARD [block_swap]:"))
    assert "moving transformer_blocks.1 to cpu did not finish within 1 s" in line and "(phase training" in line
    dump = next((tmp_path / "out").glob("hang-*.txt")).read_text()
    assert "in inject_point" in dump  # the stuck worker thread is in the dump
    assert '"phase": "failed"' in (tmp_path / "out" / "heartbeat.json").read_text()


class FakeStream:
    def __init__(self, name):
        self.name, self.waited, self.syncs = name, [], 0

    def wait_event(self, event):
        self.waited.append(event)

    def synchronize(self):
        self.syncs += 1


class FakeEvent:
    recorded: list = []

    def record(self, stream):
        self.stream = stream
        FakeEvent.recorded.append(self)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_base", "all_trainable"])
def test_cuda_stream_protocol_with_mocked_cuda(tiny_flux, monkeypatch, frozen):
    """The GPU branch on CPU tensors, CUDA objects mocked (no GPU here): every host-to-device copy's
    event is waited on by the compute stream and its tensors are recorded on it before use; trained
    weights are copied back only after the compute stream's work on them."""
    compute, side = FakeStream("compute"), FakeStream("side")
    recorded_streams = []
    FakeEvent.recorded = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded_streams.append(s), raising=False)
    ref_out, ref_gx, ref_grads = train_step(copy.deepcopy(tiny_flux), checkpointing=True, frozen=frozen)

    model = copy.deepcopy(tiny_flux)
    swapper = BlockSwapper(model, 3, "cpu", timeout=10, on_timeout=no_timeout, poison_offloaded=True)
    swapper._cuda, swapper._stream = True, side
    real_job_in = swapper._job_in

    def job_in_distinct_storage(i):  # a real device copy is new storage, not the CPU master itself
        event, _ = real_job_in(i)
        new = []
        for t, _, _ in swapper._tensors[i]:
            t.data = t.data.clone()
            new.append(t.data)
        return event, new

    swapper._job_in = job_in_distinct_storage
    try:
        out, gx, grads = train_step(model, checkpointing=True, frozen=frozen)
        swapper.prepare_block_devices_before_forward()
    finally:
        swapper.close()
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    assert all(torch.equal(g, ref_grads[n]) for n, g in grads.items())
    copies_in = [e for e in FakeEvent.recorded if e.stream is side]
    compute_done = [e for e in FakeEvent.recorded if e.stream is compute]
    assert copies_in and compute.waited == copies_in  # each copy waited for, in order
    n_tensors = {i: len(list(swapper.blocks[i].parameters())) for i in swapper.swapped}
    assert len(recorded_streams) >= len(copies_in) * min(n_tensors.values())
    assert all(s is compute for s in recorded_streams)
    if frozen:
        assert side.waited == [] and side.syncs == 0  # frozen weights: no copy back, no waiting
    else:
        assert side.waited and set(map(id, side.waited)) <= set(map(id, compute_done)) and side.syncs > 0
