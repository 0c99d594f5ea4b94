"""The web UI in a real browser (Debian chromium driven by Playwright): one user's whole session.

Create a LoRA from uploaded demo images with the cpu preset on the demo model; an invalid advanced
value shows the trainer's error first; watch progress; stop; resume; the UI process is killed and
restarted mid-run and the open page recovers by itself; the run finishes with the LoRA listed and a
sample shown. A screenshot of each page is written under the folder this test prints.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from ui_helpers import CHROMIUM_ARGS, UIServer, free_port

TIMEOUT_MS = 120_000
LATENCY: list[float] = []  # GET /api/jobs round trips while a job runs (reported, not asserted: see README)


def _api(server: UIServer, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return json.loads(r.read())


def _wait_job(server: UIServer, pred, what: str, timeout: float = 120) -> dict:
    t0 = time.monotonic()
    job = None
    while time.monotonic() - t0 < timeout:
        t1 = time.monotonic()
        jobs = _api(server, "/api/jobs")["jobs"]
        job = jobs[0] if jobs else None
        if job and job["state"] == "running":
            LATENCY.append(time.monotonic() - t1)
        if job and pred(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last job: {job}")


@pytest.fixture
def demo_setup(tmp_path):
    from fluxgym.demo import ensure_tiny_models, write_demo_images

    root = tmp_path / "proj"
    root.mkdir()
    ensure_tiny_models(root)
    (tmp_path / "upload").mkdir()
    images = write_demo_images(tmp_path / "upload")
    return root, images + [p.with_suffix(".txt") for p in images]  # images and their caption files


def test_train_stop_resume_recover_finish(demo_setup, chromium_path, artifacts_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    root, images = demo_setup
    expect.set_options(timeout=60_000)  # a loaded 2-core machine answers slowly; the waits end on success
    server = UIServer(root, free_port(), artifacts_dir / "ui-server.log")
    timings = {"server_start_s": server.start()}
    loads = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("load", lambda _: loads.append(time.monotonic()))
            page.on("dialog", lambda d: d.accept())
            t0 = time.monotonic()
            page.goto(server.url)
            page.locator("#start_training").wait_for()
            timings["page_load_s"] = time.monotonic() - t0

            page.locator("#lora_name textarea, #lora_name input").first.fill("Browser LoRA")
            page.locator("#trigger textarea, #trigger input").first.fill("fgdemo")
            page.locator("#vram label", has_text=re.compile(r"^\s*cpu\s*$")).click()
            dd = page.locator("#base_model input").first
            dd.click()
            page.get_by_role("option", name="demo", exact=True).click()
            expect(page.locator("#model_status")).to_contain_text("All model files are present")
            for elem, value in (("epochs", "2"), ("repeats", "1"), ("save_every", "1"), ("sample_every", "12")):
                box = page.locator(f"#{elem} input").first
                box.fill(value)
                box.press("Tab")
            page.locator("#uploads input[type=file]").set_input_files([str(p) for p in images])
            expect(page.locator("#captions")).to_contain_text("shape_07.png")
            expect(page.locator("#captions")).to_contain_text("fgdemo, a ")  # the uploaded captions
            expect(page.locator("#expected_steps")).to_contain_text("16")
            expect(page.locator("#preview_sh")).to_contain_text("--network_dim")

            # An invalid advanced value: the trainer's own error, before anything is queued.
            page.locator("#advanced_options").get_by_text("Advanced options").first.click()
            page.locator("#advanced_options").get_by_text("dit", exact=True).click()
            bad = page.locator("#adv__blocks_to_swap textarea, #adv__blocks_to_swap input").first
            bad.fill("lots")
            bad.press("Tab")
            page.locator("#start_training").click()
            expect(page.locator("#start_result")).to_contain_text("invalid int value: 'lots'")
            expect(page.locator("#expected_steps")).to_contain_text("--blocks_to_swap")
            page.screenshot(path=str(artifacts_dir / "new_lora_error.png"), full_page=True)
            assert _api(server, "/api/jobs")["jobs"] == []
            bad.fill("")
            bad.press("Tab")

            page.locator("#start_training").click()
            expect(page.locator("#start_result")).to_contain_text("queued")
            page.screenshot(path=str(artifacts_dir / "new_lora.png"), full_page=True)

            timings["form_to_queued_s"] = time.monotonic() - t0
            page.get_by_role("tab", name="Jobs").click()
            job = _wait_job(server, lambda j: j["state"] == "running" and j["pid"], "the run to start")
            expect(page.locator("#job_summary")).to_contain_text("running")
            expect(page.locator("#jobs_table")).to_contain_text("browser-lora")
            # Stop (confirmed in a dialog): the worker ends the whole tree, the page shows it.
            page.locator("#job_stop").click()
            _wait_job(server, lambda j: j["state"] == "stopped", "stopped")
            expect(page.locator("#job_summary")).to_contain_text("every process of this run has ended")
            assert not _alive(job["pid"]), "the stopped run's process is still alive"
            # Resume (auto: the newest checkpoint, or fresh), watch the steps advance on the page,
            # then crash the UI during the resumed run.
            page.locator("#job_resume").click()
            first = _wait_job(server, lambda j: j["state"] == "running" and (j["step"] or 0) > 0, "training steps")
            expect(page.locator("#job_summary")).to_contain_text(re.compile(r"step [1-9]\d*/16"))
            _wait_job(server, lambda j: (j["step"] or 0) > first["step"], "the step count to advance")
            timings["until_resumed_s"] = time.monotonic() - t0
            server.kill()
            timings["restart_s"] = server.start()
            recovered = _api(server, "/api/jobs")["jobs"][0]
            assert recovered["state"] in ("running", "done"), recovered  # adopted, not lost or duplicated
            done = _wait_job(server, lambda j: j["state"] not in ("running", "queued", "recovering"), "the end")
            assert done["state"] == "done" and done["success"] and done["lora_file"], done
            timings["until_done_s"] = time.monotonic() - t0
            # The page that was open through the crash recovers on its own: Gradio reloads it once when
            # the new server answers, then it stays (no reload loop) and shows the real state. The adopted
            # run can finish before that reload comes, so wait for the reload itself, not only for the page.
            deadline = time.monotonic() + 60
            while len(loads) < 2 and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            assert len(loads) >= 2, "the page did not reload after the server came back"
            page.locator("#start_training").wait_for(state="attached")
            n_loads = len(loads)
            assert n_loads <= 2, f"page loaded {n_loads} times"
            page.get_by_role("tab", name="Jobs").click()
            expect(page.locator("#job_summary")).to_contain_text("Training complete")
            expect(page.locator("#job_summary")).to_contain_text("browser-lora.safetensors")
            expect(page.locator("#samples img").first).to_be_visible()
            sample = _api(server, "/api/jobs/1/samples")["samples"][0]
            with urllib.request.urlopen(server.url + sample["url"], timeout=10) as r:
                assert r.read(8) == b"\x89PNG\r\n\x1a\n"  # the API serves the sample the gallery shows
            assert len(loads) == n_loads, "the page kept reloading after the server came back"
            t0 = time.monotonic()
            _api(server, "/api/jobs")
            timings["api_jobs_idle_s"] = time.monotonic() - t0
            page.screenshot(path=str(artifacts_dir / "jobs.png"), full_page=True)

            page.get_by_role("tab", name="Checkpoints").click()
            expect(page.locator("#ckpt_table")).to_contain_text("browser-lora.safetensors")
            expect(page.locator("#ckpt_table")).to_contain_text("state")
            expect(page.locator("#ckpt_lora_files")).to_contain_text(re.compile(r"browser-lora\s*\.safetensors"))
            page.wait_for_timeout(800)  # let the second render of the tab settle before the screenshot
            page.screenshot(path=str(artifacts_dir / "checkpoints.png"), full_page=True)
            browser.close()
    finally:
        server.stop()
        if LATENCY:
            lat = sorted(LATENCY)
            timings["api_jobs_while_training_ms"] = {"n": len(lat), "median": round(lat[len(lat) // 2] * 1000, 1),
                                                     "max": round(lat[-1] * 1000, 1)}
        (artifacts_dir / "timings.json").write_text(json.dumps(timings, indent=2))
        print(f"\n[ui tests] timings: {timings}")


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
