"""Hostile names, triggers, paths and extra arguments: scripts parse, and the trainer gets each value exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from fg_helpers import STAND_IN, make_images, setup_lora, stand_in_env
from fluxgym.cli import main
from fluxgym.naming import LoraNameError, TextFieldError, check_one_line, claim_slug, project_paths, slugify
from fluxgym.script import BatQuoteError, bat_quote

HOSTILE_NAME = "x'; $(touch PWNED) `touch PWNED2` ; rm -rf / naïve \"lora\" \\n"
HOSTILE_TRIGGER = 'it\'s "quoted" \\back\\slash $(touch PWNED) `uname` ; not\\na newline ünïcödé 🚀 [x] = 1 #'
HOSTILE_EXTRA = ["--foo", "a b", "$(touch PWNED)", "'", '"', "line1\nline2", "`id`", ";", "*", "~", "",
                 "100%", "back\\slash\\", "ünï"]
HOSTILE_DIRS = ["we ird $(touch PWNED) `touch PWNED` ;'\"& ü", "new\nline dir", "-leading dash"]


def _no_pwned(*dirs):
    for d in dirs:
        assert not list(d.rglob("PWNED*")), f"command injection: PWNED file created under {d}"


@pytest.mark.parametrize("dirname", HOSTILE_DIRS)
def test_train_sh_passes_every_value_exactly(tmp_path, dirname):
    root = tmp_path / dirname / "proj"
    root.mkdir(parents=True)
    paths, res = setup_lora(root, HOSTILE_NAME, trigger=HOSTILE_TRIGGER, extra=HOSTILE_EXTRA, sample_every=5)
    sh = res.files["train.sh"]
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resume_dir = str(paths.output_dir / "odd 'state' $(x)")
    env = stand_in_env(tmp_path, FG_MODE="ok")
    # Run from another directory, with extra arguments: they must arrive after the generated ones.
    proc = subprocess.run(["bash", str(sh), "--resume", resume_dir], cwd=elsewhere, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    rec = json.loads((tmp_path / "record.json").read_text(encoding="utf-8"))
    assert rec["argv"] == res.argv + ["--resume", resume_dir]
    assert rec["cwd"] == str(paths.root)
    assert HOSTILE_EXTRA == rec["argv"][-len(HOSTILE_EXTRA) - 2:-2]
    assert paths.final_lora.is_file()
    _no_pwned(tmp_path)


def test_script_exits_with_trainer_code(root, tmp_path):
    paths, res = setup_lora(root)
    for mode, code in (("fail", 1), ("nolora", 0)):
        proc = subprocess.run(["bash", str(res.files["train.sh"])], env=stand_in_env(tmp_path, FG_MODE=mode),
                              capture_output=True)
        assert proc.returncode == code


def test_accelerate_launcher_preserves_argv(root, tmp_path):
    """The default launcher (`python -m accelerate.commands.launch`) hands every value through unchanged."""
    paths, res = setup_lora(root, "acc", extra=HOSTILE_EXTRA[:8], launcher="accelerate")
    sh_text = res.files["train.sh"].read_text()
    assert "-m accelerate.commands.launch" in sh_text and "--num_processes 1" in sh_text
    env = stand_in_env(tmp_path, FG_MODE="ok")
    env["FLUXGYM_PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(res.files["train.sh"])], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert json.loads((tmp_path / "record.json").read_text())["argv"] == res.argv


def test_dataset_toml_round_trips_hostile_trigger(root):
    paths, res = setup_lora(root, "toml", trigger=HOSTILE_TRIGGER)
    data = tomllib.loads(res.files["dataset.toml"].read_text(encoding="utf-8"))
    subset = data["datasets"][0]["subsets"][0]
    assert subset["class_tokens"] == HOSTILE_TRIGGER
    assert subset["image_dir"] == str(paths.dataset_dir)
    assert data["general"] == {"shuffle_caption": False, "caption_extension": ".txt", "keep_tokens": 1}
    assert data["datasets"][0]["resolution"] == 64 and data["datasets"][0]["batch_size"] == 1


@pytest.mark.parametrize("trigger", ["'", '"', "\\", "a\\nb", "ünïcödé", "'''", '"""', "", " x ", "\u200b", "🚀"])
def test_dataset_toml_round_trip_each(root, trigger):
    _, res = setup_lora(root, "t", trigger=trigger)
    data = tomllib.loads(res.files["dataset.toml"].read_text(encoding="utf-8"))
    assert data["datasets"][0]["subsets"][0]["class_tokens"] == trigger


# A line break would split the trigger into two sample prompts and two caption lines; control characters have no
# place in a caption or a folder claim either. U+0085/U+2028/U+2029 are line breaks to str.splitlines().
REFUSED_CHARS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", REFUSED_CHARS)
def test_line_breaks_and_control_characters_are_refused(root, tmp_path, capsys, char):
    src = make_images(tmp_path / "src", 2)
    assert main(["prepare", "ok", "--images", str(src), "--trigger", f"a{char}b", "--root", str(root)]) == 2
    assert "--trigger contains" in capsys.readouterr().err
    assert main(["prepare", f"my{char}lora", "--images", str(src), "--trigger", "t", "--root", str(root)]) == 2
    assert "NAME contains" in capsys.readouterr().err
    assert not (root / "datasets").exists() and not (root / "outputs").exists(), "nothing written"

    assert main(["prepare", "ok", "--images", str(src), "--trigger", "fine", "--root", str(root)]) == 0
    assert main(["generate", "ok", "--vram", "16G", "--trigger", f"a{char}b", "--root", str(root)]) == 2
    assert "--trigger contains" in capsys.readouterr().err
    assert main(["generate", f"ok{char}", "--vram", "16G", "--root", str(root)]) == 2
    assert "NAME contains" in capsys.readouterr().err
    assert not (root / "outputs" / "ok" / "train.sh").exists()


def test_one_line_check_keeps_values_exactly():
    for value in (HOSTILE_TRIGGER, HOSTILE_NAME, "", "a\\nb", "ünï 🚀 \u200b"):
        assert check_one_line(value, "--trigger") is value
    with pytest.raises(TextFieldError, match=r"--trigger contains a line break \(\\n\) at character 3") as exc:
        check_one_line("ab\ncd", "--trigger")
    assert exc.value.field == "--trigger"
    with pytest.raises(TextFieldError, match=r"NAME contains a line separator \(U\+2028\) at character 1"):
        check_one_line("\u2028", "NAME")


def test_slugs():
    assert slugify("My LoRA") == "my-lora"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("Ünïcödé Cât") == "unicode-cat"
    s = slugify(HOSTILE_NAME)
    assert s and all(c.isalnum() or c in "-_" for c in s) and s == s.lower()
    with pytest.raises(LoraNameError):
        slugify("🚀 !!")
    with pytest.raises(LoraNameError):
        slugify("..")


def test_slug_collision_is_an_error(root):
    setup_lora(root, "My LoRA")
    setup_lora(root, "My LoRA")  # the same name again is fine (regenerate)
    with pytest.raises(LoraNameError, match="already belongs to"):
        claim_slug(project_paths(root, "my lora!"), "my lora!")


def test_bat_quoting_rules():
    assert bat_quote("--seed") == "--seed"
    assert bat_quote("a b") == '"a b"'
    assert bat_quote("100%") == '"100%%"'
    assert bat_quote("%PATH%&calc") == '"%%PATH%%&calc"'
    assert bat_quote("C:\\my dir\\") == '"C:\\my dir\\\\"'  # C runtime: \" would be a literal quote
    assert bat_quote("a&b|c<d>e^f(g)") == '"a&b|c<d>e^f(g)"'
    for bad in ('say "hi"', "two\nlines", "cr\r"):
        with pytest.raises(BatQuoteError):
            bat_quote(bad)


def test_bat_refuses_values_cmd_cannot_carry(root):
    _, res = setup_lora(root, "bat", extra=["--foo", 'with "quote" & calc'])
    text = res.files["train.bat"].read_bytes().decode("utf-8")
    assert "\r\n" in text and "exit /b 2" in text and "calc" not in text
    _, ok = setup_lora(root, "bat2", extra=["--foo", "50% & more"])
    good = ok.files["train.bat"].read_text(encoding="utf-8")
    assert '"50%% & more"' in good and good.rstrip().endswith("exit /b %ERRORLEVEL%") and "%*" in good


def test_stand_in_is_used(root):
    _, res = setup_lora(root, "si")
    assert str(STAND_IN) in res.files["train.sh"].read_text()
