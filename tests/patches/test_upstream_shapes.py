"""Shapes met in real upstream revisions (late 2024 to 2026) that the first fixtures did not have.

Each fixture below is our own minimal code with the same symbols and call shape as the upstream revision
it stands for (found while verifying the tool against reconstructed upstream files; nothing is copied):
- newer strategy_base reads an .npz inside `with np.load(...) as npz:` and peeks at an array's shape from
  its member header through `npz._files` / `npz.zip.open(...)` (the legacy-key fallback);
- the split layout keeps moving the resume function (config-object signature, a sub-package module,
  a method on a trainer class) and may leave thin wrappers in train_util for backward compatibility.
"""

from __future__ import annotations

import ast
import os
import subprocess
import textwrap

from patchtool_helpers import snapshot

from patches import apply

PEEKING_STRATEGY_BASE = '''\
import os

import numpy as np
from numpy.lib import format as npy_format


class LatentsCachingStrategy:
    def __init__(self, cache_to_disk=True):
        self.cache_to_disk = cache_to_disk

    def _member_shape(self, archive, key):
        # only the .npy header of one member is read: how newer revisions check an unsuffixed legacy key
        if key not in archive:
            return None
        member = archive._files.get(key, key + ".npy")
        with archive.zip.open(member) as handle:
            version = npy_format.read_magic(handle)
            header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            return header(handle)[0]

    def _default_is_disk_cached_latents_expected(self, stride, reso, path, flip_aug, alpha_mask, legacy=False):
        want = (reso[1] // stride, reso[0] // stride)
        try:
            with np.load(path) as archive:
                if f"latents_{want[0]}x{want[1]}" in archive:
                    return True
                shape = self._member_shape(archive, "latents") if legacy else None
                return shape is not None and tuple(shape[-2:]) == want
        except Exception as err:
            print(f"cannot read {path}: {err}")
            raise

    def _default_load_latents_from_disk(self, stride, path, reso, legacy=False):
        want = (reso[1] // stride, reso[0] // stride)
        suffix = f"_{want[0]}x{want[1]}"
        with np.load(path) as archive:
            if "latents" + suffix not in archive:
                shape = self._member_shape(archive, "latents") if legacy else None
                if shape is None or tuple(shape[-2:]) != want:
                    raise ValueError(f"no latents{suffix} in {path}")
                suffix = ""
            return archive["latents" + suffix], archive["original_size" + suffix].tolist()

    def save_latents_to_disk(self, path, latents, suffix=""):
        merged = {}
        if os.path.exists(path):
            previous = np.load(path)
            merged.update((name, previous[name]) for name in previous.files)
        merged["latents" + suffix] = latents
        np.savez(path, **merged)
'''


def _run(venv_python, cwd, code):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [venv_python, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_header_peek_inside_with_np_load_still_works_after_patching(make_checkout, capsys, venv_python):
    root = make_checkout("split_2026_05")
    (root / "library" / "strategy_base.py").write_text(PEEKING_STRATEGY_BASE, encoding="utf-8")
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    patched = (root / "library" / "strategy_base.py").read_text(encoding="utf-8")
    assert patched.count("with _fluxtrain_hardening.bounded_npz_load(path) as archive:") == 2
    assert "_fluxtrain_hardening.atomic_savez(path, **merged)" in patched
    code = """
        import sys
        import numpy as np
        sys.path.insert(0, ".")
        from library.strategy_base import LatentsCachingStrategy
        s = LatentsCachingStrategy()
        np.savez("legacy.npz", latents=np.ones((4, 8, 6), np.float32), original_size=np.array([48, 64]))
        print("expected", s._default_is_disk_cached_latents_expected(8, (48, 64), "legacy.npz", False, False, True))
        print("wrong size", s._default_is_disk_cached_latents_expected(8, (64, 64), "legacy.npz", False, False, True))
        latents, size = s._default_load_latents_from_disk(8, "legacy.npz", (48, 64), legacy=True)
        print("loaded", latents.shape, size)
        s.save_latents_to_disk("legacy.npz", np.zeros((4, 4, 4), np.float32), "_4x4")
        print("merged", sorted(np.load("legacy.npz").files))
    """
    proc = _run(venv_python, root, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "expected True",
        "wrong size False",
        "loaded (4, 8, 6) [48, 64]",
        "merged ['latents', 'latents_4x4', 'original_size']",
    ]


MOVED_RESUME = '''\
"""Resume helpers living in a sub-package (a later split moved them out of args.py)."""

import logging

logger = logging.getLogger(__name__)


def resume_from_local_or_hf_if_specified(
    accelerator, saving: "SavingOptions", hub: "HubOptions | None" = None
) -> None:
    if not saving.resume:
        return
    if hub is None or not hub.resume_from_huggingface:
        logger.info("resuming from %s", saving.resume)
        accelerator.load_state(saving.resume)
        return
    folder = hub.download(saving.resume)
    accelerator.load_state(folder)
'''

TRAINER_METHOD = '''\
class TrainerCore:
    def __init__(self, accelerator):
        self.accelerator = accelerator

    def resume_from_local_or_hf_if_specified(self, args) -> bool:
        if not args.resume:
            return False
        self.accelerator.load_state(args.resume)  # a method on the trainer this time
        return True
'''

ARGS_WITHOUT_RESUME = '''\
"""Argument helpers only; resume moved to library/training/resume_io.py."""


def add_training_arguments(parser):
    parser.add_argument("--resume", type=str, default=None)
'''


def test_resume_moved_to_other_library_modules_is_found_and_patched(make_checkout, capsys):
    root = make_checkout("split_2026_05")
    lib = root / "library"
    (lib / "args.py").write_text(ARGS_WITHOUT_RESUME, encoding="utf-8")
    (lib / "training").mkdir()
    (lib / "training" / "__init__.py").write_text("", encoding="utf-8")
    (lib / "training" / "resume_io.py").write_text(MOVED_RESUME, encoding="utf-8")
    (lib / "trainer_core.py").write_text(TRAINER_METHOD, encoding="utf-8")
    before = snapshot(root)
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "library/training/resume_io.py" in out and "library/trainer_core.py" in out
    moved = (lib / "training" / "resume_io.py").read_text(encoding="utf-8")
    assert moved.count("_fluxtrain_hardening.load_state_with_fallback(accelerator, ") == 2
    method = (lib / "trainer_core.py").read_text(encoding="utf-8")
    assert "_fluxtrain_hardening.load_state_with_fallback(self.accelerator, args.resume)" in method
    assert apply.main(["--check", str(root)]) == 0
    assert apply.main(["--reverse", str(root)]) == 0
    assert snapshot(root) == before


WRAPPER_TRAIN_UTIL = '''\
"""Backward-compatible wrappers: the real functions moved to checkpoint_io / args."""

from library import args as _args
from library import checkpoint_io


def save_and_remove_state_stepwise(args, accelerator, step_no):
    return checkpoint_io.save_and_remove_state_stepwise(args, accelerator, step_no)


def save_state_on_train_end(args, accelerator):
    checkpoint_io.save_state_on_train_end(args, accelerator)


def resume_from_local_or_hf_if_specified(accelerator, args):
    return _args.resume_from_local_or_hf_if_specified(accelerator, args)
'''


def test_thin_wrappers_left_in_train_util_are_not_drift(make_checkout, capsys):
    root = make_checkout("split_2026_05")
    shim = root / "library" / "train_util.py"
    shim.write_text(WRAPPER_TRAIN_UTIL, encoding="utf-8")
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    assert shim.read_text(encoding="utf-8") == WRAPPER_TRAIN_UTIL  # nothing to patch in a wrapper
    assert "# hardening:P04 begin" in (root / "library" / "checkpoint_io.py").read_text(encoding="utf-8")
    assert apply.main(["--check", str(root)]) == 0


def test_a_function_that_neither_saves_nor_delegates_is_still_drift(make_checkout, capsys):
    root = make_checkout("split_2026_05")
    shim = root / "library" / "train_util.py"
    shim.write_text("def save_state_on_train_end(args, accelerator):\n    print('saving disabled')\n", encoding="utf-8")
    before = snapshot(root)
    assert apply.main([str(root)]) == 3
    err = capsys.readouterr().err
    assert "P04" in err and "library/train_util.py" in err and "save_state_on_train_end" in err
    assert snapshot(root) == before


PACKED_ARGUMENTS = '''\
import os

import torch


def build(args, dataset, collate):
    workers = min(args.max_data_loader_n_workers, os.cpu_count() - 1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, shuffle=False, collate_fn=collate, num_workers=workers
    )
    legacy = torch.utils.data.DataLoader(
        dataset, batch_size=1, collate_fn=collate, num_workers=workers,
        persistent_workers=args.persistent_data_loader_workers)
    return loader, legacy
'''


def test_arguments_packed_on_one_line_between_bracket_lines(make_checkout, capsys):
    # all arguments on one line with the brackets on their own lines, and the older style that closes the
    # call on the last argument line: new keywords go on a new line with the argument line's indentation
    root = make_checkout("split_2026_05")
    script = root / "train_db.py"
    script.write_text(PACKED_ARGUMENTS, encoding="utf-8")
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    text = script.read_text(encoding="utf-8")
    assert (
        "        dataset, batch_size=1, shuffle=False, collate_fn=collate, num_workers=workers,\n"
        "        timeout=_fluxtrain_hardening.dataloader_timeout(workers),\n"
        "        pin_memory=True,\n"
        "    )\n"
    ) in text
    calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)]
    loaders = [c for c in calls if getattr(c.func, "attr", "") == "DataLoader"]
    assert len(loaders) == 2
    for call in loaders:
        names = [k.arg for k in call.keywords]
        assert names[-2:] == ["timeout", "pin_memory"] and "num_workers" in names
        assert [ast.unparse(a) for a in call.args] == ["dataset"]
    assert apply.main(["--reverse", str(root)]) == 0
    assert script.read_text(encoding="utf-8") == PACKED_ARGUMENTS


WRITE_ONLY_SAVER = '''\
import os

import numpy as np


class LatentsCachingStrategy:
    def _default_is_disk_cached_latents_expected(self, stride, reso, path, flip_aug, alpha_mask):
        if not os.path.exists(path):
            return False
        npz = np.load(path)
        return "latents" in npz

    def _default_load_latents_from_disk(self, stride, path, reso):
        npz = np.load(path)
        return npz["latents"], npz["original_size"].tolist(), npz["crop_ltrb"].tolist(), None, None

    def save_latents_to_disk(self, path, latents, original_size, crop_ltrb):
        # one resolution per file: nothing to merge, so nothing is read before the write
        np.savez(path, latents=latents, original_size=np.array(original_size), crop_ltrb=np.array(crop_ltrb))
'''


def test_a_saver_that_only_writes_is_patched_not_drift(make_checkout, capsys):
    root = make_checkout("split_2026_05")
    target = root / "library" / "strategy_base.py"
    target.write_text(WRITE_ONLY_SAVER, encoding="utf-8")
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    text = target.read_text(encoding="utf-8")
    assert text.count("_fluxtrain_hardening.bounded_npz_load(path)") == 2
    assert "_fluxtrain_hardening.atomic_savez(path, latents=latents" in text


def test_stray_files_that_do_not_parse_are_skipped_not_drift(make_checkout, capsys):
    # users leave scratch copies next to the real files; only the known homes must parse
    root = make_checkout("split_2026_05")
    (root / "my_loader_notes.py").write_text("loader = DataLoader(ds, num_workers=2\n", encoding="utf-8")
    (root / "library" / "checkpoint_io - Copy.py").write_bytes(
        b"def save_state_on_train_end(args, accelerator):\n    print 'py2'\n"
    )
    strays = (root / "my_loader_notes.py", root / "library" / "checkpoint_io - Copy.py")
    before_stray = {p: p.read_bytes() for p in strays}
    assert apply.main([str(root)]) == 0, capsys.readouterr()
    assert {p: p.read_bytes() for p in before_stray} == before_stray
    assert apply.main(["--check", str(root)]) == 0
    # a known script that does not parse is still reported
    (root / "flux_train.py").write_text("def broken(:\n", encoding="utf-8")
    assert apply.main(["--check", str(root)]) == 3
    assert "flux_train.py: cannot be parsed" in capsys.readouterr().err
