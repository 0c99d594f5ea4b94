"""The "Jobs" and "Checkpoints" tabs: the queue, one job's progress, log, loss and samples; checkpoints.

Everything shown is read from the job store and the run's files on a timer (every 2 s); buttons are
engine commands. Success is shown only for a `done` job whose LoRA file exists.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from fluxgym.webui import actions
from fluxgym.webui.form import FieldError

ACTIVE = actions.ACTIVE_STATES
TABLE_HEADERS = ["id", "LoRA", "state", "phase", "step", "epoch", "it/s", "ETA", "last checkpoint", "restarts"]


def _eta(s) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _step(j: dict) -> str:
    return f"{j['step'] if j['step'] is not None else '-'}/{j['total_steps'] or '-'}"


def job_rows(jobs: list[dict]) -> list[list]:
    rows = []
    for j in jobs:
        ckpt = ""
        if j.get("last_checkpoint"):
            ckpt = f"{Path(j['last_checkpoint']).name} (step {j.get('last_checkpoint_step')})"
        reasons = [r.get("reason", "?") if isinstance(r, dict) else str(r) for r in j.get("restart_reasons") or []]
        restarts = f"{j['restarts']} ({', '.join(reasons)})" if j.get("restarts") else "0"  # details: summary
        rows.append([j["id"], j["lora"], j["state"] + (" (stopping)" if j.get("stop_requested") and
                                                        j["state"] in ACTIVE else ""),
                     j.get("phase") or "", _step(j), j.get("epoch") if j.get("epoch") is not None else "",
                     f"{j['it_per_s']:.2f}" if j.get("it_per_s") else "", _eta(j.get("eta_s")), ckpt, restarts])
    return rows


def job_summary(j: dict) -> str:
    text = _state_summary(j)
    if j.get("restarts") or j.get("restarts_text"):
        text += f"\n\nRestarted {j.get('restarts') or 0} time(s): {j['restarts_text']}"
    return text


def _state_summary(j: dict) -> str:
    state = j["state"]
    head = f"### Job {j['id']}: `{j['lora']}` is **{state}**"
    if j["success"]:
        return head + f"\n\nTraining complete. LoRA: `{j['lora_file']}`"
    if state == "done":
        return head + "\n\nThe run ended but **no LoRA file was found**; it is not a success. Retry the job."
    if state == "failed":
        first = j.get("error") or "the trainer exited with an error (see the log)"
        todo = j.get("hint") or "read the log below, fix it, then Retry."
        return head + f"\n\n**Error:** {first}\n\n**What to do:** {todo}"
    if state == "stopped":
        return head + ("\n\nStopped: every process of this run has ended. **Resume** continues from the newest "
                       "checkpoint (or pick one).")
    if state == "interrupted":
        return head + "\n\nThe run was interrupted (the UI or the machine stopped). Resume it to continue."
    if j.get("stop_requested"):
        return head + "\n\nStop requested: ending the whole process tree..."
    bits = [f"phase **{j.get('phase') or 'starting'}**", f"step {_step(j)}"]
    if j.get("epoch") is not None:
        bits.append(f"epoch {j['epoch']}")
    if j.get("it_per_s"):
        bits.append(f"{j['it_per_s']:.2f} it/s")
    if j.get("eta_s") is not None:
        bits.append(f"ETA {_eta(j['eta_s'])}")
    return head + "\n\n" + ", ".join(bits)


def _choices(jobs: list[dict]) -> list[tuple[str, str]]:
    """Dropdown entries: "3: my-lora (running)" shown, the id kept as the value."""
    return [(f"{j['id']}: {j['lora']} ({j['state']})", str(j["id"])) for j in jobs]


def _checkpoint_choices(job) -> list[str]:
    return ["auto"] + [c["path"] for c in actions.job_checkpoints(job) if c["kind"] == "state" and c["valid"]]


def build_jobs(root: Path) -> gr.Timer:
    timer = gr.Timer(2.0)
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, label="Queue", elem_id="jobs_table")
    with gr.Row():
        job_dd = gr.Dropdown([], label="Job", elem_id="job_select", scale=1)
        ckpt_dd = gr.Dropdown(["auto"], value="auto", label="Resume from", elem_id="resume_from", scale=3)
    with gr.Row():
        stop = gr.Button("Stop", variant="stop", elem_id="job_stop")
        resume = gr.Button("Resume", elem_id="job_resume")
        retry = gr.Button("Retry", elem_id="job_retry")
        delete = gr.Button("Delete", elem_id="job_delete")
    message = gr.Markdown("", elem_id="job_message")
    summary = gr.Markdown("No jobs yet: start one on the New LoRA tab.", elem_id="job_summary")
    with gr.Row():
        loss = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", title="Loss",
                           elem_id="loss_chart", height=260)
        gallery = gr.Gallery(label="Samples", columns=3, height=260, elem_id="samples")
    log = gr.Textbox(label="Log (last 60 lines)", lines=14, max_lines=14, autoscroll=True, elem_id="job_log")

    def tick(selected):
        try:
            jobs = actions.list_jobs(root)
        except Exception as exc:  # the store unreadable: say so, keep the page alive
            return [], gr.update(), gr.update(), f"**Job store unavailable:** {exc}", gr.update(), gr.update(), ""
        ids = [str(j["id"]) for j in jobs]
        sel = str(selected) if selected and str(selected) in ids else (ids[0] if ids else None)
        if sel is None:
            return (job_rows(jobs), gr.update(choices=[], value=None), gr.update(),
                    "No jobs yet: start one on the New LoRA tab.", gr.update(), gr.update(), "")
        jd = next(j for j in jobs if str(j["id"]) == sel)
        job = actions.get_job(root, int(sel))
        pts = actions.loss_points(job)
        df = pd.DataFrame({"step": [p[0] for p in pts], "loss": [p[1] for p in pts]})
        samples = [(s["path"], s["name"]) for s in actions.job_samples(job)]
        ckpts = _checkpoint_choices(job)
        return (job_rows(jobs), gr.update(choices=_choices(jobs), value=sel), gr.update(choices=ckpts),
                job_summary(jd), df, samples, "\n".join(actions.job_log(job, 60)))

    outs = [table, job_dd, ckpt_dd, summary, loss, gallery, log]
    timer.tick(tick, job_dd, outs, show_progress="hidden")
    job_dd.input(tick, job_dd, outs, show_progress="hidden")  # user choice only: tick sets it too

    def run(action):
        def fn(selected, ckpt, confirmed=True):
            if not selected:
                return "Select a job first."
            if not confirmed:
                return "Not stopped."
            try:
                out = actions.command(root, int(selected), action, None if ckpt in (None, "auto") else ckpt)
            except (FieldError, LookupError, ValueError, RuntimeError) as exc:
                return f"**{action} refused:** {exc}"
            if action == "delete":
                return f"Job {selected} deleted (its LoRA files are kept)."
            return f"{action}: job {out['id']} is now {out['state']}" + (
                " (stop requested)" if out.get("stop_requested") and out["state"] in ACTIVE else "") + \
                f" ({time.strftime('%H:%M:%S')})"
        return fn

    confirm = gr.Checkbox(False, visible=False)
    stop.click(run("stop"), [job_dd, ckpt_dd, confirm], message,
               js="(job, c, ok) => [job, c, confirm('Stop job ' + job + '? Its whole process tree is ended; "
                  "it can be resumed from its last checkpoint.')]")
    resume.click(run("resume"), [job_dd, ckpt_dd], message)
    retry.click(run("retry"), [job_dd, ckpt_dd], message)
    delete.click(run("delete"), [job_dd, ckpt_dd, confirm], message,
                 js="(job, c, ok) => [job, c, confirm('Delete job ' + job + ' from the queue? Files are kept.')]")
    return timer


def build_checkpoints(root: Path) -> None:
    gr.Markdown("Every checkpoint of a LoRA with its step, epoch, size and whether it can be used.")
    with gr.Row():
        job_dd = gr.Dropdown([], label="Job", elem_id="ckpt_job", scale=2)
        refresh = gr.Button("Refresh", elem_id="ckpt_refresh", scale=1)
    table = gr.Dataframe(headers=["kind", "name", "step", "epoch", "size (MB)", "valid", "why not"], value=[],
                         interactive=False, elem_id="ckpt_table")
    with gr.Row():
        ckpt_dd = gr.Dropdown(["auto"], value="auto", label="Resume from", elem_id="ckpt_resume_from", scale=3)
        resume = gr.Button("Resume from this checkpoint", elem_id="ckpt_resume", scale=1)
    with gr.Row():
        keep = gr.Number(1, label="Keep the newest N valid state folders", precision=0, elem_id="ckpt_keep")
        prune = gr.Button("Prune older / invalid state folders", elem_id="ckpt_prune")
    lora_file = gr.File(label="LoRA files (download)", file_count="multiple", interactive=False,
                        elem_id="ckpt_lora_files")
    message = gr.Markdown("", elem_id="ckpt_message")

    def load(selected):
        jobs = actions.list_jobs(root)
        ids = [str(j["id"]) for j in jobs]
        sel = str(selected) if selected and str(selected) in ids else (ids[0] if ids else None)
        if sel is None:
            return gr.update(choices=[], value=None), [], gr.update(choices=["auto"]), None
        job = actions.get_job(root, int(sel))
        cks = actions.job_checkpoints(job)
        rows = [[c["kind"], Path(c["path"]).name, c["step"], c["epoch"], round((c["size"] or 0) / 2**20, 2),
                 "yes" if c["valid"] else "no", c["reason"]] for c in cks]
        loras = [c["path"] for c in cks if c["kind"] == "model" and c["valid"]]
        return (gr.update(choices=_choices(jobs), value=sel), rows, gr.update(choices=_checkpoint_choices(job)),
                loras or None)

    outs = [job_dd, table, ckpt_dd, lora_file]
    refresh.click(load, job_dd, outs)
    job_dd.input(load, job_dd, outs)

    def do_resume(selected, ckpt):
        try:
            out = actions.command(root, int(selected), "resume", None if ckpt in (None, "auto") else ckpt)
        except (FieldError, LookupError, ValueError, RuntimeError, TypeError) as exc:
            return f"**Resume refused:** {exc}"
        return f"Job {out['id']} queued again from {ckpt}."

    def do_prune(selected, n):
        try:
            removed = actions.prune_checkpoints(root, int(selected), int(n or 1))
        except (FieldError, LookupError, ValueError, TypeError) as exc:
            return f"**Prune refused:** {exc}"
        return f"Removed {len(removed)} state folder(s)." + "".join(f"\n- `{Path(p).name}`" for p in removed)

    resume.click(do_resume, [job_dd, ckpt_dd], message)
    prune.click(do_prune, [job_dd, keep], message).then(load, job_dd, outs)
    return load, outs, job_dd
