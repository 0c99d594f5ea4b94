"""The JSON API under /api (what scripts and the browser tests use; documented in the README).

Every error is `{"error": message, "field": name}` with a 4xx status: 400 a bad value (the field
names the input), 404 no such job, 409 a command the job's state does not allow or a second job for a
LoRA that already has one (field "name"), 503 the job store
cannot be opened. Handlers are plain `def`s: FastAPI runs them in its thread pool, so a slow store
write never blocks the event loop that serves the pages.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from fluxgym import __version__
from fluxgym.jobs import IllegalTransition, StoreError
from fluxgym.jobs import commands as engine
from fluxgym.webui import actions
from fluxgym.webui.form import FieldError, TrainForm

NothingToDo = getattr(engine, "NothingToDo", LookupError)


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def _guard(fn):
    """Run a handler body and turn the engine's and the form's exceptions into JSON errors."""
    try:
        return fn()
    except actions.JobConflict as exc:
        return _error(409, str(exc), exc.field)
    except FieldError as exc:
        return _error(400, str(exc), exc.field)
    except actions.NotFound as exc:
        return _error(404, str(exc), "id")
    except (NothingToDo, IllegalTransition) as exc:
        return _error(409, str(exc), "state")
    except StoreError as exc:
        return _error(503, str(exc), None)
    except ValueError as exc:  # the engine's refusals (a second run of one LoRA, a bad checkpoint)
        return _error(409, str(exc), "state")


def install_error_handlers(app) -> None:
    """FastAPI's own validation errors (a body that is not a JSON object, a bad path value) in our shape."""
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        # A body that is not JSON at all comes as ("body", <character offset>): the field is the body.
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query") and not isinstance(p, int)]
        field = "body" if first.get("type") == "json_invalid" or not loc else loc[-1]
        return _error(400, f"{field}: {first.get('msg', 'invalid value')}", field)


def build_router(root: Path, worker=None) -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get("/health")
    def health():
        alive = bool(worker is not None and getattr(worker, "_thread", None) is not None
                     and worker._thread.is_alive())
        return {"ok": True, "version": __version__, "root": str(root), "worker": alive}

    @r.get("/jobs")
    def jobs():
        return _guard(lambda: {"jobs": actions.list_jobs(root)})

    @r.post("/jobs")
    def create(body: dict = Body(...)):
        def run():
            form = TrainForm.from_mapping(body)
            return JSONResponse(actions.create_job(root, form), status_code=201)
        return _guard(run)

    @r.get("/jobs/{job_id}")
    def one(job_id: int):
        return _guard(lambda: actions.job_view(root, actions.get_job(root, job_id)))

    @r.post("/jobs/{job_id}/{action}")
    def act(job_id: int, action: str, request: Request, body: dict | None = Body(None)):
        if action not in ("stop", "resume", "retry"):
            return _error(404, f"unknown action '{action}': use stop, resume or retry", "action")
        checkpoint = (body or {}).get("checkpoint") if isinstance(body, dict) else None
        if checkpoint is not None and not isinstance(checkpoint, str):
            return _error(400, "checkpoint must be a state folder path or \"auto\"", "checkpoint")
        if checkpoint == "auto":
            checkpoint = None
        return _guard(lambda: actions.command(root, job_id, action, checkpoint))

    @r.delete("/jobs/{job_id}")
    def remove(job_id: int):
        return _guard(lambda: actions.command(root, job_id, "delete"))

    @r.get("/jobs/{job_id}/log")
    def log(job_id: int, tail: int = Query(200, ge=1, le=5000)):
        return _guard(lambda: {"id": job_id, "lines": actions.job_log(actions.get_job(root, job_id), tail)})

    @r.get("/jobs/{job_id}/events")
    def events(job_id: int):
        return _guard(lambda: {"id": job_id, "events": actions.job_events(actions.get_job(root, job_id))})

    @r.get("/jobs/{job_id}/checkpoints")
    def checkpoints(job_id: int):
        return _guard(lambda: {"id": job_id,
                               "checkpoints": actions.job_checkpoints(actions.get_job(root, job_id))})

    @r.get("/jobs/{job_id}/samples")
    def samples(job_id: int):
        def run():
            found = actions.job_samples(actions.get_job(root, job_id))
            for s in found:
                s["url"] = f"/api/jobs/{job_id}/files/sample/{s['name']}"
            return {"id": job_id, "samples": found}
        return _guard(run)

    @r.get("/jobs/{job_id}/files/{kind}/{name}")
    def file(job_id: int, kind: str, name: str):
        """A sample image or the LoRA file of this job; names are matched against a listing, never joined."""
        def run():
            job = actions.get_job(root, job_id)
            if kind == "sample":
                allowed = {s["name"]: s["path"] for s in actions.job_samples(job)}
            elif kind == "lora":
                allowed = {Path(c["path"]).name: c["path"] for c in actions.job_checkpoints(job)
                           if c["kind"] == "model" and c["valid"]}
            else:
                allowed = {}
            if name not in allowed:
                return _error(404, f"no {kind} file named {name!r} for job {job_id}", "name")
            return FileResponse(allowed[name], filename=name)
        return _guard(run)

    return r
