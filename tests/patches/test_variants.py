"""Call shapes the tool was not tuned to (keyword order, line breaks, extra args, comments, CRLF, Unicode)
must patch cleanly with no false drift, stay valid Python and reverse to the exact bytes."""

from __future__ import annotations

import ast
import textwrap

from patchtool_helpers import snapshot

from patches import apply

TRAIN_NETWORK = '''\
import os

import torch
from torch.utils.data import DataLoader


def loaders(args, ds, val_ds, collator, accelerator, loader_kwargs):
    n_workers = min(args.max_data_loader_n_workers, os.cpu_count())
    データ = ds  # 日本語の名前: column offsets are UTF-8 bytes in ast
    train_dataloader = torch.utils.data.DataLoader(
        データ,  # the dataset group
        num_workers=n_workers,  # workers first this time
        collate_fn=collator,
        # shuffle every epoch
        shuffle=True,
        batch_size=1,
        persistent_workers=args.persistent_data_loader_workers  # no trailing comma
    )
    positional = DataLoader(ds, 1, False, None, None, n_workers)
    has_timeout = DataLoader(ds, num_workers=2, timeout=5)
    from_dict = DataLoader(ds, **loader_kwargs)
    prepared = accelerator.prepare(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=n_workers, drop_last=True, prefetch_factor=2))
    a, b = DataLoader(ds, num_workers=n_workers), DataLoader(val_ds, num_workers=n_workers)  # two in one line
    if args.validate:
        return torch.utils.data.DataLoader(val_ds,
                                           batch_size=1,
                                           num_workers=n_workers)
    return train_dataloader, positional, has_timeout, from_dict, prepared, a, b
'''

OFFLOADING = '''\
from concurrent.futures import ThreadPoolExecutor


class Offloader:
    def __init__(self):
        self.thread_pool = ThreadPoolExecutor(max_workers=1)
        self.futures = {}

    def _wait_blocks_move(self, idx):
        if idx not in self.futures:
            return
        bidx_to_cpu, bidx_to_cuda = self.futures.pop(idx).result()  # wait for the copy
        assert idx == bidx_to_cuda
'''

STRATEGY_BASE = '''\
import os

import numpy


class LatentsCachingStrategy:
    def _default_is_disk_cached_latents_expected(self, latents_stride, bucket_reso, npz_path, flip_aug, alpha_mask):
        with numpy.load(npz_path) as npz:
            return "latents" in npz

    def _default_load_latents_from_disk(self, latents_stride, npz_path, bucket_reso):
        npz = numpy.load(
            npz_path,
            allow_pickle=False,  # never unpickle cache files
        )
        return npz["latents"], None, None, None, None

    def save_latents_to_disk(self, npz_path, latents):
        kwargs = dict(numpy.load(npz_path)) if os.path.exists(npz_path) else {}
        kwargs["latents"] = latents
        numpy.savez_compressed(npz_path, **kwargs)
'''

STRATEGY_FLUX = '''\
import numpy as np


class FluxTextEncoderOutputsCachingStrategy:
    def is_disk_cached_outputs_expected(self, npz_path):
        if "l_pooled" not in np.load(npz_path):
            return False
        return True

    def load_outputs_npz(self, npz_path):
        data = np.load(npz_path); return [data["l_pooled"]]  # noqa: E702
'''

TRAIN_UTIL = '''\
import os


class StateSaver:
    def __init__(self, accelerator):
        self.accelerator = accelerator

    def save_and_remove_state_stepwise(self, args, global_step):
        self.accelerator.save_state(
            os.path.join(args.output_dir, f"at-step{global_step:08d}-state"),  # folder per step
            safe_serialization=True,
        )


def resume_from_local_or_hf_if_specified(accelerator, args):
    if args.resume:
        accelerator.load_state(args.resume, strict=False)
'''


def _write(root, rel, text, crlf=False):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes(data.encode("utf-8"))


def _make(tmp_path, flux_text=STRATEGY_FLUX):
    root = tmp_path / "variants"
    _write(root, "library/__init__.py", "")
    _write(root, "train_network.py", TRAIN_NETWORK)
    _write(root, "library/custom_offloading_utils.py", OFFLOADING, crlf=True)
    _write(root, "library/strategy_base.py", STRATEGY_BASE)
    _write(root, "library/strategy_flux.py", flux_text)
    _write(root, "library/train_util.py", TRAIN_UTIL)
    return root


def _dataloader_keywords(text):
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "DataLoader":
            found.append([kw.arg for kw in node.keywords])
    return found


def test_unfamiliar_shapes_patch_without_false_drift(tmp_path, capsys):
    flux = STRATEGY_FLUX.replace('data = np.load(npz_path); return [data["l_pooled"]]  # noqa: E702',
                                 'data = np.load(npz_path)\n        return [data["l_pooled"]]')
    root = _make(tmp_path, flux)
    before = snapshot(root)
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    after = snapshot(root)
    tn = after["train_network.py"].decode()
    for keywords in _dataloader_keywords(tn):
        names = [k for k in keywords if k]
        assert names.count("timeout") <= 1 and names.count("pin_memory") <= 1
        assert ("timeout" in names and "pin_memory" in names) or None in keywords  # None: the **kwargs call
    assert "harden_dataloader_kwargs(loader_kwargs, skip=())" in tn
    assert "dataloader_timeout(n_workers)" in tn and "timeout=5, pin_memory=True" in tn
    assert tn.count("# hardening:P01 begin") == 7  # two loaders share one statement, so one block
    for comment in ("# the dataset group", "# workers first this time", "# shuffle every epoch", "# no trailing comma"):
        assert comment in tn
    off = after["library/custom_offloading_utils.py"]
    assert b"\r\n" in off and off.count(b"\n") == off.count(b"\r\n")  # CRLF kept, no stray LF
    assert b"wait_swap_future(self.futures.pop(idx), idx)" in off
    base = after["library/strategy_base.py"].decode()
    assert "with _fluxtrain_hardening.bounded_npz_load(npz_path) as npz:" in base
    assert "atomic_savez_compressed(npz_path, **kwargs)" in base and "numpy.load" not in base
    util = after["library/train_util.py"].decode()
    assert "save_state_at_step(self.accelerator, global_step," in util
    assert "load_state_with_fallback(accelerator, args.resume, strict=False)" in util
    for rel, data in after.items():
        if rel.endswith(".py"):
            compile(data, rel, "exec")
    assert apply.main(["--check", str(root)]) == 0
    assert apply.main([str(root)]) == 0 and snapshot(root) == after
    assert apply.main(["--reverse", str(root)]) == 0
    assert snapshot(root) == before
    capsys.readouterr()


def test_a_site_sharing_its_line_with_other_code_is_drift_not_a_broken_edit(tmp_path, capsys):
    root = _make(tmp_path)  # load_outputs_npz puts np.load and a return on one line
    before = snapshot(root)
    assert apply.main([str(root)]) == 3
    err = capsys.readouterr().err
    assert "P03" in err and "library/strategy_flux.py" in err and "load_outputs_npz" in err
    assert snapshot(root) == before


def test_a_known_function_without_its_call_is_drift(tmp_path, capsys):
    moved = textwrap.dedent('''\
        import numpy as np


        class FluxTextEncoderOutputsCachingStrategy:
            def is_disk_cached_outputs_expected(self, npz_path):
                return np.load(npz_path) is not None

            def load_outputs_npz(self, npz_path):
                return read_cache(npz_path)  # moved somewhere this tool does not know
        ''')
    root = _make(tmp_path, moved)
    assert apply.main([str(root)]) == 3
    err = capsys.readouterr().err
    assert "FluxTextEncoderOutputsCachingStrategy.load_outputs_npz" in err
