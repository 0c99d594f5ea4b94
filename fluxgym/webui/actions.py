"""What the pages and the JSON API do, on top of the job engine (fluxgym.jobs) and the run's own files.

Creating a job: check the form (and the trainer's parser), refuse when the LoRA already has an active
job, build the dataset in a fresh folder and swap it in, then `submit`. Everything else reads the job
store and the files the trainer and supervisor write (train.log, events.jsonl, sample/, checkpoints).
Commands (stop/resume/retry/delete) are store writes; the Worker acts on them, as for the CLI.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from fluxgym.jobs import JobStore, StoreError
from fluxgym.jobs import commands as engine
from fluxgym.naming import LoraNameError, check_claim, project_paths, slugify
from fluxgym.prepare import DatasetError, list_images, prepare_dataset
from fluxgym.presets import get_preset
from fluxgym.status import checkpoint_validation, job_lora_file, log_tail
from fluxgym.webui.form import FieldError, TrainForm, preflight

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running", "stalled", "recovering")
REASONS = {"stall": "it stopped making progress (stall)", "oom": "it ran out of GPU memory (OOM)",
           "crash": "the trainer crashed", "interrupted": "it was interrupted (the machine or the UI stopped)"}
# One submission at a time in this process: two tabs pressing Start together must not both pass the
# "no active job" check before either job exists (the engine's own refusal covers other processes).
_submit_lock = threading.Lock()


class NotFound(LookupError):
    pass


class JobConflict(FieldError):
    """The form is fine, but the LoRA already has a waiting or running job (HTTP 409, not a bad value)."""


def _store(root: Path) -> JobStore:
    return JobStore.open(root)


def _slug_of(job) -> str:
    try:
        return slugify(job.lora)
    except LoraNameError:
        return job.lora


def get_job(root: Path, job_id: int):
    job = _store(root).get(int(job_id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def active_job_for(root: Path, slug: str):
    for job in _store(root).list():
        if job.state in ACTIVE_STATES and _slug_of(job) == slug:
            return job
    return None


def _swap_in_dataset(images: Path, dataset_dir: Path, trigger: str, resolution: int) -> int:
    """Prepare into a fresh sibling folder, then replace the old dataset (never a mix of old and new)."""
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.new-", dir=dataset_dir.parent))
    try:
        done = prepare_dataset(images, fresh, trigger=trigger, resolution=resolution)
    except Exception:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    old = None
    if dataset_dir.exists():
        old = dataset_dir.with_name(f".{dataset_dir.name}.old-{os.getpid()}-{threading.get_ident()}")
        os.replace(dataset_dir, old)
    os.replace(fresh, dataset_dir)
    # The prepared files name their folder inside dataset.toml only, which generate writes next.
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return len(done)


def create_job(root: Path, form: TrainForm, staged_images: Path | None = None) -> dict:
    """Dataset + scripts + a queued job; FieldError names what to fix. Returns the job view."""
    root = Path(root).resolve()
    preflight(form, root)  # every settings check, the trainer's parser included
    paths = project_paths(root, form.name)
    try:
        check_claim(paths, form.name)
    except LoraNameError as exc:
        raise FieldError("name", str(exc)) from exc
    images = staged_images
    if images is None:
        if not form.images_dir.strip():
            raise FieldError("images_dir", "no images: upload images or give images_dir, a folder on the server")
        images = Path(form.images_dir).expanduser()
        if not images.is_dir():
            raise FieldError("images_dir", f"images_dir: folder not found on the server: {images}")
    with _submit_lock:
        busy = active_job_for(root, paths.slug)
        if busy is not None:
            raise JobConflict("name", f"LoRA '{paths.slug}' already has job {busy.id} ({busy.state}); stop it "
                                     "or wait for it to end before starting another run")
        resolution = form.resolution or get_preset(form.vram).resolution
        try:
            _swap_in_dataset(images, paths.dataset_dir, form.trigger, resolution)
        except DatasetError as exc:
            raise FieldError("images" if staged_images is not None else "images_dir", str(exc)) from exc
        prompts = root / "outputs" / ".fluxgym" / "ui" / f"{paths.slug}-sample_prompts.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text(form.prompts_text(), encoding="utf-8")
        try:
            job = engine.submit(root, form.options(root, prompts))
        except (ValueError, StoreError) as exc:
            raise FieldError("name", str(exc)) from exc
    return job_view(root, job)


def job_view(root: Path, job) -> dict:
    """The job object of the API: the store's fields plus what the page shows in plain words."""
    d = job.to_dict()
    d["lora_file"] = lora = job_lora_file(job)
    d["lora_exists"] = bool(lora) and Path(lora).is_file()
    d["success"] = d["state"] == "done" and d["lora_exists"]
    d["restarts_text"] = "; ".join(_reason_words(r) for r in d.get("restart_reasons") or [])
    return d


def _reason_words(r) -> str:
    if not isinstance(r, dict):
        return REASONS.get(str(r), str(r))
    text = REASONS.get(r.get("reason"), str(r.get("reason")))
    if r.get("at_step") is not None:
        text += f" at step {r['at_step']}"
    return text + (f" ({r['detail']})" if r.get("detail") else "")


def list_jobs(root: Path) -> list[dict]:
    return [job_view(root, j) for j in _store(root).list()]


def command(root: Path, job_id: int, action: str, checkpoint: str | None = None) -> dict:
    job = get_job(root, job_id)
    if action == "stop":
        job = engine.cancel(root, job.id)
    elif action == "resume":
        job = engine.resume(root, job.id, checkpoint or None)
    elif action == "retry":
        job = engine.retry(root, job.id)
    elif action == "delete":
        engine.delete(root, job.id)
        return {"id": job.id, "deleted": True}
    else:
        raise FieldError("action", f"unknown action '{action}'")
    return job_view(root, job)


def job_log(job, tail: int = 200) -> list[str]:
    if not job.log_file:
        return []
    return log_tail(Path(job.log_file), lines=max(1, min(int(tail), 5000)), max_bytes=1 << 20)


def job_events(job) -> list[dict]:
    from fluxgym.supervise import read_events

    if not job.events_file or not Path(job.events_file).is_file():
        return []
    events, _ = read_events(Path(job.events_file), 0)
    return events


def loss_points(job) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in job_events(job)
            if e.get("event") == "step" and isinstance(e.get("loss"), (int, float)) and e.get("step") is not None]


def job_samples(job) -> list[dict]:
    folder = Path(job.output_dir or "") / "sample"
    if not job.output_dir or not folder.is_dir():
        return []
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")),
                   key=lambda p: p.stat().st_mtime)
    return [{"path": str(p), "name": p.name} for p in files]


def job_checkpoints(job) -> list[dict]:
    if not job.output_dir or not Path(job.output_dir).is_dir():
        return []
    cv = checkpoint_validation()
    out = []
    for kind in ("state", "model"):
        for info in cv.discover(Path(job.output_dir), kind=kind, output_name=_slug_of(job)):
            out.append(info.to_json())
    return out


def prune_checkpoints(root: Path, job_id: int, keep: int = 1) -> list[str]:
    """Delete state folders beyond the newest `keep` valid ones, and invalid leftovers; not while active."""
    job = get_job(root, job_id)
    if job.state in ACTIVE_STATES:
        raise FieldError("keep", f"job {job.id} is {job.state}: stop it before pruning its checkpoints")
    if keep < 1:
        raise FieldError("keep", "keep must be at least 1 (the newest valid checkpoint is what resume uses)")
    cv = checkpoint_validation()
    removed = []
    kept = 0
    for info in cv.discover(Path(job.output_dir), kind="state", output_name=_slug_of(job)):
        if info.valid and kept < keep:
            kept += 1
            continue
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(str(info.path))
    return removed


def dataset_images(root: Path, name: str) -> list[Path]:
    paths = project_paths(root, name)
    return list_images(paths.dataset_dir) if paths.dataset_dir.is_dir() else []
