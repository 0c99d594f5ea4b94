"""apply / apply-again / --check / --reverse / drift / not-applicable on both fixture layouts."""

from __future__ import annotations

import json
import py_compile

from patchtool_helpers import snapshot

from patches import apply, engine

IDS = ("P01", "P02", "P03", "P04")


def _run(capsys, *argv) -> tuple:
    code = apply.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_apply_marks_every_site_and_compiles(checkout, capsys, tmp_path):
    before = snapshot(checkout)
    code, out, _ = _run(capsys, str(checkout))
    assert code == 0, out
    after = snapshot(checkout)
    changed = {rel for rel in after if before.get(rel) != after[rel] and not rel.startswith(engine.STATE_DIR)}
    assert "library/fluxtrain_hardening.py" in changed
    text = "".join(after[rel].decode() for rel in changed if rel.endswith(".py"))
    for pid in IDS:
        assert text.count(f"# hardening:{pid} begin") == text.count(f"# hardening:{pid} end") > 0
    assert "# FIX:" in text and "np.load(" not in after["library/strategy_flux.py"].decode()
    assert "move.result()" not in after["library/custom_offloading_utils.py"].decode()
    state_code = "".join(after[r].decode() for r in changed if "train_util" in r or "checkpoint_io" in r)
    assert "accelerator.save_state(" not in state_code and "save_state_at_step(accelerator, step_no," in state_code
    for i, rel in enumerate(sorted(changed)):
        py_compile.compile(str(checkout / rel), cfile=str(tmp_path / f"{i}.pyc"), doraise=True)
    state = json.loads(after[f"{engine.STATE_DIR}/state.json"])
    assert set(state["files"]) == changed
    assert all(v == "applied" for v in state["patches"].values())


def test_apply_again_is_byte_identical_and_check_passes(checkout, capsys):
    assert _run(capsys, str(checkout))[0] == 0
    once = snapshot(checkout)
    code, out, _ = _run(capsys, str(checkout))
    assert code == 0 and "already applied" in out
    assert snapshot(checkout) == once
    assert _run(capsys, "--check", str(checkout))[0] == 0


def test_check_reports_missing_on_pristine_checkout(checkout, capsys):
    before = snapshot(checkout)
    code, out, _ = _run(capsys, "--check", "--json", str(checkout))
    assert code == 1
    report = json.loads(out)
    assert {p["id"]: p["status"] for p in report["patches"]} == dict.fromkeys(IDS, "missing")
    assert snapshot(checkout) == before


def test_reverse_restores_exact_original_bytes(checkout, capsys):
    before = snapshot(checkout)
    assert _run(capsys, str(checkout))[0] == 0
    code, out, _ = _run(capsys, "--reverse", str(checkout))
    assert code == 0 and "restored library/fluxtrain_hardening.py" in out
    assert snapshot(checkout) == before  # helper deleted, state folder gone, every byte back
    assert _run(capsys, "--reverse", str(checkout))[0] == 0  # nothing left to do


def test_reverse_refuses_a_file_edited_after_patching(checkout, capsys):
    assert _run(capsys, str(checkout))[0] == 0
    target = checkout / "library/custom_offloading_utils.py"
    target.write_text(target.read_text() + "\n# local edit\n")
    code, _, err = _run(capsys, "--reverse", str(checkout))
    assert code == 1 and "library/custom_offloading_utils.py" in err
    assert (checkout / engine.STATE_DIR / "originals/library/custom_offloading_utils.py").is_file()


def test_drift_exits_3_naming_patch_file_symbol_and_writes_nothing(checkout, capsys):
    target = checkout / "library/custom_offloading_utils.py"
    drifted = target.read_text().replace(
        "arrived = move.result()[1]", "arrived = concurrent_wait(move)[1]"
    )
    assert drifted != target.read_text()
    target.write_text(drifted)
    before = snapshot(checkout)
    code, _, err = _run(capsys, str(checkout))
    assert code == 3
    assert "P02" in err and "library/custom_offloading_utils.py" in err and "Offloader._wait_blocks_move" in err
    assert snapshot(checkout) == before
    assert _run(capsys, "--check", str(checkout))[0] == 3


def test_absent_module_is_not_applicable(checkout, capsys):
    (checkout / "library/custom_offloading_utils.py").unlink()
    code, out, _ = _run(capsys, "--json", str(checkout))
    assert code == 0
    status = {p["id"]: p["status"] for p in json.loads(out)["patches"]}
    assert status["P02"] == "not applicable"
    assert status["P01"] == status["P03"] == status["P04"] == "applied"
    assert _run(capsys, "--check", str(checkout))[0] == 0


def test_list_and_dry_run_write_nothing(checkout, capsys):
    before = snapshot(checkout)
    code, out, _ = _run(capsys, "--list", str(checkout))
    assert code == 0
    for pid in IDS:
        assert f"{pid} " in out
    assert "why:" in out
    code, out, _ = _run(capsys, "--dry-run", str(checkout))
    assert code == 0 and "would change:" in out and "train_network.py" in out
    assert snapshot(checkout) == before


def test_usage_errors_exit_2(tmp_path, capsys):
    assert _run(capsys, str(tmp_path / "missing"))[0] == 2
    (tmp_path / "not_sd").mkdir()
    code, _, err = _run(capsys, str(tmp_path / "not_sd"))
    assert code == 2 and "sd-scripts" in err


def test_state_records_upstream_commit(checkout, capsys):
    git = checkout / ".git"
    (git / "refs/heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/sd3\n")
    (git / "refs/heads/sd3").write_text("3265f2edfbb80d393a495ff5e37e3e89e7545492\n")
    assert _run(capsys, str(checkout))[0] == 0
    state = json.loads((checkout / engine.STATE_DIR / "state.json").read_text())
    assert state["upstream_commit"] == "3265f2edfbb80d393a495ff5e37e3e89e7545492"


def test_reapply_after_upstream_update_records_the_new_original(checkout, capsys):
    assert _run(capsys, str(checkout))[0] == 0
    target = checkout / "library/custom_offloading_utils.py"
    originals = checkout / engine.STATE_DIR / "originals"
    updated = (originals / "library/custom_offloading_utils.py").read_text() + "\n\nUPSTREAM_ADDED = 1\n"
    target.write_text(updated)  # what `git reset --hard` + pull leaves: new upstream bytes, no markers
    assert _run(capsys, "--check", str(checkout))[0] == 1
    assert _run(capsys, str(checkout))[0] == 0
    assert "# hardening:P02 begin" in target.read_text() and "UPSTREAM_ADDED" in target.read_text()
    assert (originals / "library/custom_offloading_utils.py").read_text() == updated
    assert _run(capsys, "--reverse", str(checkout))[0] == 0
    assert target.read_text() == updated
