"""Seeded shape fuzz: many layouts of the target calls in many statement contexts must patch with no drift,
change nothing but the intended call edits (compared on the syntax tree), and be stable on a second run.

Written after verifying the tool against real upstream revisions: one real layout (all arguments packed on
one line between bracket lines) slipped through the hand-written variants, so this explores combinations.
"""

from __future__ import annotations

import ast
import random
import shutil

import pytest
from patchtool_helpers import FIXTURES

from patches import engine

HELPER = "_fluxtrain_hardening"

# How a DataLoader call may be laid out; {ds} and {w} are the dataset and worker-count expressions.
CALL_LAYOUTS = [
    "torch.utils.data.DataLoader({ds}, batch_size=1, num_workers={w})",
    "DataLoader({ds}, batch_size=1, shuffle=True, num_workers={w},)",
    "torch.utils.data.DataLoader(\n    {ds},\n    batch_size=1,\n    num_workers={w},\n)",
    "torch.utils.data.DataLoader(\n    {ds},\n    num_workers={w},  # workers\n"
    "    batch_size=1  # no trailing comma\n)",
    "torch.utils.data.DataLoader(\n    {ds}, batch_size=1, num_workers={w}\n)",
    "torch.utils.data.DataLoader(\n    {ds}, batch_size=1,\n    num_workers={w})",
    "torch.utils.data.DataLoader({ds},\n" + " " * 28 + "batch_size=1,\n" + " " * 28 + "num_workers={w})",
    "DataLoader(\n    {ds},\n    # a comment line between arguments\n    num_workers={w},\n"
    "    collate_fn=lambda b: (\n        b[0]\n    ),\n)",
    "DataLoader({ds}, 1, False, None, None, {w})",
    "DataLoader({ds}, num_workers={w}, timeout=5)",
    "DataLoader({ds}, num_workers={w}, pin_memory=False)",
    "DataLoader({ds}, **{{'num_workers': {w}, 'batch_size': 1}})",
    "DataLoader(\n    {ds},\n    **loader_kwargs,\n)",
    "DataLoader({ds}, num_workers={w}, collate_fn=fmt('(', ')'))",
    "DataLoader(\n    データ if {ds} is None else {ds},  # 日本語\n    num_workers={w},\n)",
]

# Statement contexts; {call} is one laid-out call, already indented for continuation lines.
CONTEXTS = [
    "loader = {call}",
    "loader: object = {call}",
    "return {call}",
    "self.loader = {call}",
    "loaders.append({call})",
    "a, b = {call}, None",
    "loader = accelerator.prepare({call})",
    "loader = {call} if use_loader else None",
    "loader = [{call} for _ in range(2)]",
    "loader = (lambda: {call})()",
    "with closing({call}) as loader:\n    pass",
    "if probe({call}):\n    pass",
    "for batch in {call}:\n    pass",
    "while not ready({call}):\n    break",
    "loader = {call}  # trailing comment",
]

SCRIPT_HEAD = """\
import torch
from torch.utils.data import DataLoader


class Trainer:
"""

METHOD = """\
    def build_{n}(self, ds, n_workers, loader_kwargs, accelerator, loaders, use_loader, データ=None):
{body}
"""


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _continuation(call: str, spaces: int) -> str:
    first, *rest = call.splitlines()
    return "\n".join([first, *(" " * spaces + line for line in rest)])


def _place(context: str, call: str) -> str:
    """The context as a method body (8 spaces deep) with the call in it, continuation lines kept inside."""
    head = (context.split("{call}")[0].splitlines() or [""])[-1]
    body = _indent(context.replace("{call}", "\u0000"), 8)
    return body.replace("\u0000", _continuation(call, 8 + len(head)))


def _script(layout: str, rng: random.Random) -> str:
    """One file per call layout, one method per statement context (every pair is covered)."""
    methods = []
    for n, context in enumerate(CONTEXTS):
        call = layout.format(ds=rng.choice(["ds", "self.ds", "ds[0]"]), w="n_workers")
        methods.append(METHOD.format(n=n, body=_place(context, call)))
    return SCRIPT_HEAD + "\n".join(methods)


class _Normalise(ast.NodeTransformer):
    """Undo exactly what P01 may add, so the rest of the tree can be compared with the original."""

    def visit_ImportFrom(self, node):
        return None if any(a.asname == HELPER for a in node.names) else node

    def visit_Call(self, node):
        func = node.func
        if getattr(func, "attr", getattr(func, "id", "")) == "DataLoader":
            node.keywords = [k for k in node.keywords if k.arg not in ("timeout", "pin_memory")]
        self.generic_visit(node)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == HELPER:
            assert func.attr == "harden_dataloader_kwargs", ast.unparse(node)
            return node.args[0]
        return node


def _normalised(text: str) -> str:
    return ast.dump(_Normalise().visit(ast.parse(text)))


@pytest.mark.parametrize("batch", range(3))
def test_every_dataloader_layout_in_every_context_patches_exactly_and_stably(tmp_path, batch):
    root = tmp_path / "checkout"
    shutil.copytree(FIXTURES / "split_2026_05", root)
    rng = random.Random(batch)
    originals = {}
    for i, layout in enumerate(CALL_LAYOUTS[batch::3]):
        text = _script(layout, rng)
        compile(text, f"layout{i}", "exec")  # the generator itself must produce valid Python
        raw = text.replace("\n", "\r\n") if i % 2 else text  # every other file uses CRLF line endings
        (root / f"zz_layout{i}.py").write_bytes(raw.encode("utf-8"))
        originals[f"zz_layout{i}.py"] = text
    series = engine.load_series()
    plan = engine.plan(root, series)
    assert plan.drift == []
    engine.apply_plan(plan)
    for rel, text in originals.items():
        patched = (root / rel).read_bytes().decode("utf-8")
        if "\r\n" in patched:
            assert "\n" not in patched.replace("\r\n", ""), f"{rel}: mixed line endings"
            patched = patched.replace("\r\n", "\n")
        assert _normalised(patched) == _normalised(text), rel
        loaders = [n for n in ast.walk(ast.parse(patched)) if isinstance(n, ast.Call)]
        loaders = [c for c in loaders if getattr(c.func, "attr", getattr(c.func, "id", "")) == "DataLoader"]
        assert len(loaders) == len(CONTEXTS)
        for call in loaders:
            names = {k.arg for k in call.keywords}
            assert None in names or {"timeout", "pin_memory"} <= names, f"{rel}: {ast.unparse(call)}"
    again = engine.plan(root, series)
    assert again.drift == [] and again.new_texts == {} and again.complete


# The same idea for the cache reads/writes (P03) and the state save/load calls (P04).
CACHE_LAYOUTS = [
    "np.load({p})",
    "np.load(\n    {p},\n    allow_pickle=False,  # cache files hold no objects\n)",
    "np.load({p}, mmap_mode=None)",
    "np.savez({p}, latents=x, size=np.array([1, 2]))",
    "np.savez(\n    {p},\n    **arrays\n)",
    "np.savez_compressed({p}, *positional)",
]
STATE_LAYOUTS = [
    "accelerator.save_state({p})",
    "self.accelerator.save_state(\n    {p},\n    safe_serialization=True,\n)",
    "accelerator.load_state({p})",
    "accelerator.load_state(\n    {p}  # the folder\n)",
    "accelerator.load_state()",
]
IO_CONTEXTS = [
    "data = {call}",
    "return {call}",
    "{call}",
    "with {call} as data:\n    pass",
    "result = dict({call})",
    "result = ({call} if use_it else None)",
    "try:\n    data = {call}\nexcept OSError:\n    raise",
    "if use_it:\n    {call}\nelse:\n    pass",
]

IO_METHOD = """\
    def {name}(self, accelerator, x, arrays, positional, use_it, step_no):
{body}
"""


def _io_module(layouts, first_name: str, rng: random.Random) -> str:
    methods = []
    for i, layout in enumerate(layouts):
        for j, context in enumerate(IO_CONTEXTS):
            call = layout.format(p=rng.choice(["path", "self.path", "os.path.join(root, name)"]))
            name = first_name if (i, j) == (0, 0) else f"case_{i}_{j}"
            methods.append(IO_METHOD.format(name=name, body=_place(context, call)))
    return "import os\n\nimport numpy as np\n\n\nclass Module:\n" + "\n".join(methods)


_BACK = {
    "bounded_npz_load": ("load", 0),
    "atomic_savez": ("savez", 0),
    "atomic_savez_compressed": ("savez_compressed", 0),
    "save_state_at_step": ("save_state", 2),
    "load_state_with_fallback": ("load_state", 1),
}


class _NormaliseIO(ast.NodeTransformer):
    """Undo exactly what P03/P04 may change: the callee (plus its leading receiver/step arguments)."""

    def visit_ImportFrom(self, node):
        return None if any(a.asname == HELPER for a in node.names) else node

    def visit_Call(self, node):
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == HELPER:
            attr, skip = _BACK[func.attr]
            receiver = ast.Name(id="np", ctx=ast.Load()) if skip == 0 else node.args[0]
            node.func = ast.Attribute(value=receiver, attr=attr, ctx=ast.Load())
            node.args = node.args[skip:]
        return node


@pytest.mark.parametrize("seed", range(2))
def test_cache_and_state_calls_in_every_context_patch_exactly_and_stably(tmp_path, seed):
    root = tmp_path / "checkout"
    shutil.copytree(FIXTURES / "split_2026_05", root)
    rng = random.Random(seed)
    files = {
        "library/strategy_flux.py": _io_module(CACHE_LAYOUTS, "load_outputs_npz", rng),
        "library/zz_state_io.py": _io_module(STATE_LAYOUTS, "save_state_on_train_end", rng),
    }
    for rel, text in files.items():
        compile(text, rel, "exec")
        (root / rel).write_text(text, encoding="utf-8")
    series = engine.load_series()
    plan = engine.plan(root, series)
    assert plan.drift == []
    engine.apply_plan(plan)
    normalise = lambda text: ast.dump(_NormaliseIO().visit(ast.parse(text)))  # noqa: E731
    for rel, text in files.items():
        patched = (root / rel).read_text(encoding="utf-8")
        assert normalise(patched) == normalise(text), rel
        left = [n for n in ast.walk(ast.parse(patched)) if isinstance(n, ast.Call)]
        left = [ast.unparse(c.func) for c in left]
        targets = ("np.load", "np.savez", "accelerator.", "self.accelerator.")
        assert [f for f in left if f.startswith(targets)] == [], rel  # every target call now goes through the helper
    again = engine.plan(root, series)
    assert again.drift == [] and again.new_texts == {} and again.complete
