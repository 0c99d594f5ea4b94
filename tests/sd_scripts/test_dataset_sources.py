"""--dataset_class and the dataset.toml keys validation_split, validation_seed and metadata_file.

A dataset class written into the test's folder drives one tiny training run whose items, captions and repeats
are checked against what the test wrote; every --dataset_class error stops the run with exit 2 before the
output folder (and so any model) is touched; the toml keys hold out, and caption, exactly what the flags do.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from library.dataset import build_dataset
from library.dataset_config import DatasetConfigError, blueprints_from_train_data_dir, load_dataset_config
from library.settings import ValidationSettings
from library.validation import split_dataset
from train_helpers import run_trainer_in_process, trainer_args

# (file, caption, num_repeats, is_reg): what the dataset class reads from items.json
ITEMS = [("a/red.png", "tok, red square", 2, False), ("a/green.png", "tok, green square", 1, False),
         ("b/blue.png", "tok, blue square", 3, False), ("reg/grey.png", "a square", 1, True)]
DATASET_MODULE = """
    import json
    from pathlib import Path


    class {name}:
        '''Items from items.json beside this module: the protocol of library.dataset_class.'''

        def __init__(self, args):
            self.rows = json.loads((Path(__file__).parent / "items.json").read_text())
            self.resolution = args.resolution  # the parsed flags arrive as an argparse.Namespace

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, index):
            image, caption, repeats, is_reg = self.rows[index]
            {body}
"""


def _write_images(root: Path, names) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (60 * i % 255, 120, 200 - 40 * i)).save(root / name)


def _dataset_module(root: Path, module: str, rows=ITEMS, name: str = "Pairs",
                    body: str = 'return {"image": image, "caption": caption, "num_repeats": repeats, '
                                '"is_reg": is_reg}') -> str:
    (root / "items.json").write_text(json.dumps([list(r) for r in rows]), encoding="utf-8")
    (root / f"{module}.py").write_text(textwrap.dedent(DATASET_MODULE).format(name=name, body=body),
                                       encoding="utf-8")
    return f"{module}.{name}"


def _class_args(models, out: Path, spec: str, *extra: str) -> list[str]:
    argv = trainer_args(models, Path("unused.toml"), out, "--dataset_class", spec, "--resolution", "64", *extra)
    at = argv.index("--dataset_config")
    return argv[:at] + argv[at + 2:]


def test_dataset_class_trains_with_its_items_captions_and_repeats(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the module and the relative image paths are found from the current directory
    _write_images(tmp_path, [row[0] for row in ITEMS])
    spec = _dataset_module(tmp_path, "dsclass_e2e")
    out = tmp_path / "out"
    assert run_trainer_in_process(_class_args(tiny_models, out, spec, "--max_train_steps", "2")) == 0

    train = [row for row in ITEMS if not row[3]]
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["fluxtrain_dataset_class"] == spec
    assert int(meta["ss_num_train_images"]) == sum(row[2] for row in train) == 6
    assert meta["ss_num_reg_images"] == "1"
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["a"] == {"tok": 2, "red square": 1, "green square": 1} and tags["b"] == {"tok": 1, "blue square": 1}
    assert tags["reg"] == {"a square": 1}
    dirs = json.loads(meta["ss_dataset_dirs"])
    # the reg image is shown as often as the training images with repeats (upstream's balancing): 1 + 5 extra
    assert dirs == {"a": {"n_repeats": 2, "img_count": 2}, "b": {"n_repeats": 3, "img_count": 1},
                    "reg": {"n_repeats": 6, "img_count": 1}}
    subsets = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert [(s["num_repeats"], s["is_reg"]) for s in subsets] == [(2, False), (1, False), (3, False), (1, True)]
    for name, *_ in ITEMS:  # latents and text encodings cached beside each image, as for image folders
        image = tmp_path / name
        assert list(image.parent.glob(f"{image.stem}_0064x0064*.npz")), name
        assert list(image.parent.glob(f"{image.stem}*_te.npz")), name


BAD_ROWS = {
    "no_caption": ('return {"image": image}', "item 0 has no 'caption'"),
    "not_a_mapping": ("return [image, caption]", "item 0 is a list, not a mapping"),
    "typo_key": ('return {"image": image, "caption": caption, "num_repeat": 2}', "unknown key(s) 'num_repeat'"),
    "bad_repeats": ('return {"image": image, "caption": caption, "num_repeats": 0}', "'num_repeats' must be"),
}


@pytest.mark.parametrize("case", ["no_module", "no_class", *sorted(BAD_ROWS), "missing_image", "unreadable_image",
                                  "with_dataset_config", "with_train_data_dir", "with_in_json"])
def test_dataset_class_errors_exit_2_before_anything_loads(tiny_models, tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    module = f"dsclass_err_{case}"  # one module name per case: imported modules stay in sys.modules
    rows = [("img/one.png", "one", 1, False), ("img/two.png", "two", 1, False)]
    _write_images(tmp_path, [r[0] for r in rows])
    body, expected = BAD_ROWS.get(case, (None, None))
    spec = _dataset_module(tmp_path, module, rows, **({"body": body} if body else {}))
    extra: list[str] = []
    if case == "no_module":
        spec, expected = "no_such_pkg_xyz.Pairs", "cannot import module no_such_pkg_xyz (ModuleNotFoundError"
    elif case == "no_class":
        spec, expected = f"{module}.Missing", f"module {module} ({tmp_path / module}.py) has no class Missing"
    elif case == "missing_image":
        (tmp_path / "img" / "two.png").unlink()
        expected = f"image file {tmp_path / 'img' / 'two.png'} (item 1 of --dataset_class {spec}) does not exist"
    elif case == "unreadable_image":
        (tmp_path / "img" / "two.png").write_bytes(b"not a png at all")
        expected = f"image file {tmp_path / 'img' / 'two.png'} (item 1 of --dataset_class {spec}) cannot be read"
    elif case.startswith("with_"):
        flag = "--" + case[len("with_"):]
        extra = [flag, str(tmp_path / "img")]
        expected = f"--dataset_class {spec} with {flag} {tmp_path / 'img'}"
    out = tmp_path / "out"
    rc = run_trainer_in_process(_class_args(tiny_models, out, spec, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err[-2000:]
    if case in BAD_ROWS:
        assert f"--dataset_class {spec}" in err
    assert not out.exists()  # stopped in the preflight: no lock, no run record, no model loaded


def _folders(root: Path) -> tuple[Path, Path]:
    a, b = root / "a", root / "b"
    _write_images(root, [f"a/{i}.png" for i in range(6)] + [f"b/{i}.png" for i in range(5)])
    for folder in (a, b):
        for image in folder.glob("*.png"):
            image.with_suffix(".txt").write_text(f"caption of {image.stem}", encoding="utf-8")
    return a, b


def _held_out(toml: Path, flags: ValidationSettings) -> list[Path]:
    blueprints = load_dataset_config(toml, cli={"caption_extension": ".txt"})
    data = build_dataset(blueprints, seed=1)
    _, held = split_dataset(data, flags, blueprints)
    return [] if held is None else [data.items[i].image_path for i in held.indices]


def test_toml_validation_keys_hold_out_what_the_flags_hold_out(tmp_path):
    a, b = _folders(tmp_path)

    def toml(name: str, dataset_keys: str) -> Path:
        path = tmp_path / name
        path.write_text(f"[[datasets]]\nresolution = 64\n{dataset_keys}\n[[datasets.subsets]]\nimage_dir = '{a}'\n"
                        f"[[datasets.subsets]]\nimage_dir = '{b}'\n", encoding="utf-8")
        return path

    by_flags = _held_out(toml("plain.toml", ""), ValidationSettings(split=0.4, seed=7))
    assert len(by_flags) == 2 + 2  # ceil(6 * 0.6) = 4 of 6 and ceil(5 * 0.6) = 3 of 5 train
    by_keys = _held_out(toml("keys.toml", "validation_split = 0.4\nvalidation_seed = 7\n"), ValidationSettings())
    assert by_keys == by_flags
    # a value in the file wins over the command line, as for the other keys
    assert _held_out(toml("keys.toml", "validation_split = 0.4\nvalidation_seed = 7\n"),
                     ValidationSettings(split=0.2, seed=3)) == by_flags
    assert _held_out(toml("seed.toml", "validation_seed = 9\n"), ValidationSettings(split=0.4, seed=7)) != by_flags
    assert _held_out(toml("off.toml", "validation_split = 0.0\n"), ValidationSettings(split=0.4, seed=7)) == []


def test_toml_validation_keys_reach_the_trainer(tmp_path, capsys):
    """Through the real command line (--debug_dataset lists what training would use): the same listing."""
    a, b = _folders(tmp_path)
    base = ["--pretrained_model_name_or_path", "/missing/f", "--clip_l", "/missing/c", "--t5xxl", "/missing/t",
            "--ae", "/missing/a", "--caption_extension", ".txt", "--output_dir", str(tmp_path / "out"),
            "--debug_dataset"]
    listings = []
    for name, keys, flags in (("flags.toml", "", ["--validation_split", "0.4", "--validation_seed", "7"]),
                              ("keys.toml", "validation_split = 0.4\nvalidation_seed = 7\n", [])):
        (tmp_path / name).write_text(f"[[datasets]]\nresolution = 64\n{keys}[[datasets.subsets]]\nimage_dir = '{a}'\n"
                                     f"[[datasets.subsets]]\nimage_dir = '{b}'\n", encoding="utf-8")
        assert run_trainer_in_process(base + ["--dataset_config", str(tmp_path / name), *flags]) == 0
        listings.append(capsys.readouterr().out)
    assert listings[0] == listings[1] and "held out for validation: 4" in listings[0]


def test_metadata_file_subset_is_in_json_for_that_subset(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _write_images(tmp_path, [f"imgs/{i}.png" for i in range(3)])
    (folder / "0.txt").write_text("from the caption file, never read", encoding="utf-8")
    meta = {"0": {"caption": "a cat", "tags": "tag1, tag2"}, str(folder / "1.png"): {"tags": "solo, red"},
            "2.png": {"caption": "third"}}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    cli = {"resolution": [64, 64], "num_repeats": 2, "caption_prefix": "photo:"}

    def items(blueprints):
        return [(i.image_path, i.caption, i.num_repeats) for i in build_dataset(blueprints, seed=1).items]

    by_flag = items(blueprints_from_train_data_dir(folder, cli=cli, in_json=folder / "meta.json"))
    assert by_flag[0] == (folder / "0.png", "photo: a cat,tag1, tag2", 2)
    toml = tmp_path / "d.toml"
    for subset in (f"metadata_file = '{folder / 'meta.json'}'\nimage_dir = '{folder}'",
                   f"metadata_file = '{folder / 'meta.json'}'"):  # without image_dir: the file's folder
        toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\n{subset}\n", encoding="utf-8")
        assert items(load_dataset_config(toml, cli=cli)) == by_flag

    (folder / "bad.json").write_text(json.dumps({"nope": {"caption": "y"}}), encoding="utf-8")
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{folder / 'bad.json'}'\n", encoding="utf-8")
    expected = r"metadata_file \S+bad\.json in \[\[datasets\.subsets\]\] #1 .*d\.toml: no image for 1 key\(s\)"
    with pytest.raises(DatasetConfigError, match=expected):
        build_dataset(load_dataset_config(toml, cli=cli), seed=1)
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{folder / 'meta.json'}'\nis_reg = true\n",
                    encoding="utf-8")
    with pytest.raises(DatasetConfigError, match=r"is_reg and metadata_file in \[\[datasets\.subsets\]\] #1"):
        load_dataset_config(toml, cli=cli)
