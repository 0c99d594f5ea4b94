"""The JSON API and the New LoRA checks, in-process and without a worker (jobs stay queued).

Bad input is refused with a message naming the field before anything is queued or written; values
with quotes, `$()` and unicode reach the files and the trainer's argv exactly; two tabs submitting
the same LoRA at once give one job.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
import tomllib
from ui_helpers import write_images

BASE = {"vram": "cpu", "base_model": "demo", "epochs": 1, "save_every": 1, "repeats": 1, "workers": 0}


def _job(client, **over):
    return client.post("/api/jobs", json={**BASE, **over})


def test_health_and_empty_queue(client):
    assert client.get("/api/health").json()["ok"] is True
    assert client.get("/api/jobs").json() == {"jobs": []}
    r = client.get("/api/jobs/7")
    assert r.status_code == 404 and r.json()["field"] == "id"
    r = client.post("/api/jobs", json=["not", "an", "object"])
    assert r.status_code == 400 and r.json()["field"] == "body", r.text
    r = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body", r.text
    r = client.get("/api/jobs/abc")
    assert r.status_code == 400 and r.json()["field"] == "job_id", r.text
    r = client.get("/api/jobs/1/log?tail=0")
    assert r.status_code == 400 and r.json()["field"] == "tail", r.text


@pytest.mark.parametrize("field,value,needle", [
    ("name", "bad\nname", "line break"),
    ("trigger", "tok\x07en", "U+0007"),
    ("name", "", "empty"),
    ("epochs", "many", "whole number"),
    ("epochs", 0, "at least 1"),
    ("colour", "red", "unknown field"),
    ("lr", "fast", "positive number"),
    ("base_model", "no-such-model", "unknown base model"),
    ("extra", ["--blocks_to_swap", "lots"], "invalid int value: 'lots'"),
    ("extra", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("extra", ["--timestep_sampling", "sideways"], "invalid choice: 'sideways'"),
    ("extra", ["--fp8_base"], "--fp8_base needs --mixed_precision"),  # the trainer's settings check
    ("extra", ["--network_dim", "0"], "--network_dim 0: must be at least 1"),  # the trainer's preflight ranges
    ("extra", ["--learning_rate", "-1"], "--learning_rate -1.0: must be more than 0"),
    ("images_dir", "/nonexistent/folder", "folder not found"),
])
def test_bad_values_are_refused_naming_the_field(client, api_root, tmp_path, field, value, needle):
    images = write_images(tmp_path / "imgs")[0].parent
    body = {"name": "Fine", "images_dir": str(images), field: value}
    r = _job(client, **body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["field"] == (field if field != "colour" else "colour"), err
    assert needle in err["error"], err
    # Nothing queued, no dataset and no scripts written.
    assert client.get("/api/jobs").json()["jobs"] == []
    assert not (api_root / "datasets" / "fine").exists()
    assert not (api_root / "outputs" / "fine" / "train.sh").exists()


def test_quotes_dollar_and_unicode_round_trip(client, api_root, tmp_path):
    canary = tmp_path / "CANARY"
    images = write_images(tmp_path / "imgs")[0].parent
    name = "Zoë's \"$(touch x)\" LoRA"
    trigger = f"ünï 'tok' \"q\" $(touch {canary}) `id` \\n ✓"
    comment = f"$(touch {canary}); echo 'it''s' \"fine\" | ü"
    r = _job(client, name=name, trigger=trigger, images_dir=str(images), extra=["--training_comment", comment])
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["lora"] == "zoe-s-touch-x-lora"
    out = api_root / "outputs" / job["lora"]
    toml = tomllib.loads((out / "dataset.toml").read_text(encoding="utf-8"))
    assert toml["datasets"][0]["subsets"][0]["class_tokens"] == trigger
    assert (out / ".fluxgym-name").read_text(encoding="utf-8") == name
    assert job["argv"][job["argv"].index("--training_comment") + 1] == comment
    # train.sh hands every value to the interpreter as one argv element: run it with a stand-in
    # interpreter that records its argv instead of training.
    dump = tmp_path / "dump.py"
    record = tmp_path / "argv.json"
    dump.write_text(f"#!{os.sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    dump.chmod(0o755)
    subprocess.run(["bash", str(out / "train.sh")], env=dict(os.environ, FLUXGYM_PYTHON=str(dump)), check=True,
                   timeout=60)
    argv = json.loads(record.read_text())
    assert argv[argv.index("--training_comment") + 1] == comment
    assert not canary.exists() and not (api_root / "x").exists()
    assert client.get(f"/api/jobs/{job['id']}").json()["settings"]["generate"]["trigger"] == trigger


def test_two_tabs_starting_the_same_lora_give_one_job(client, api_root, tmp_path):
    images = write_images(tmp_path / "imgs")[0].parent
    answers = []
    gate = threading.Barrier(2)

    def submit():
        gate.wait()
        answers.append(_job(client, name="Same", images_dir=str(images)))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 409], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 409).json()
    assert refused["field"] == "name" and "already has job" in refused["error"]
    assert len(client.get("/api/jobs").json()["jobs"]) == 1


def test_commands_follow_the_job_state(client, tmp_path):
    images = write_images(tmp_path / "imgs")[0].parent
    job = _job(client, name="cmds", images_dir=str(images)).json()
    r = client.post(f"/api/jobs/{job['id']}/retry")
    assert r.status_code == 409 and r.json()["field"] == "state"
    r = client.post(f"/api/jobs/{job['id']}/stop")
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    r = client.post(f"/api/jobs/{job['id']}/resume", json={"checkpoint": str(tmp_path)})
    assert r.status_code == 409 and "not a usable state folder" in r.json()["error"]
    assert client.post(f"/api/jobs/{job['id']}/jump").status_code == 404
    assert client.get(f"/api/jobs/{job['id']}/log?tail=5").json()["lines"] == []
    assert client.get(f"/api/jobs/{job['id']}/checkpoints").json()["checkpoints"] == []
    assert client.get(f"/api/jobs/{job['id']}/samples").json()["samples"] == []
    assert client.get(f"/api/jobs/{job['id']}/files/sample/..%2F..%2Ftrain.sh").status_code == 404
    assert client.delete(f"/api/jobs/{job['id']}").json()["deleted"] is True
    assert client.get("/api/jobs").json()["jobs"] == []


def test_a_name_owned_by_another_lora_is_refused(client, api_root, tmp_path):
    images = write_images(tmp_path / "imgs")[0].parent
    assert _job(client, name="My LoRA", images_dir=str(images)).status_code == 201
    before = sorted(p.name for p in (api_root / "datasets" / "my-lora").iterdir())
    other = write_images(tmp_path / "other", n=2, size=64)[0].parent
    r = _job(client, name="my lora", images_dir=str(other))
    assert r.status_code == 400 and r.json()["field"] == "name" and "belongs to" in r.json()["error"]
    assert sorted(p.name for p in (api_root / "datasets" / "my-lora").iterdir()) == before
