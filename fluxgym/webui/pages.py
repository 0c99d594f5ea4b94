"""The Gradio Blocks: New LoRA, Jobs and Checkpoints tabs (FluxGym's layout and labels where it had them)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from fluxgym.webui import jobs_page, new_lora_page


def build_blocks(root: Path) -> gr.Blocks:
    with gr.Blocks(title="FluxGym", analytics_enabled=False) as blocks:
        gr.Markdown("## FluxGym: FLUX LoRA training")
        with gr.Tabs():
            with gr.Tab("New LoRA", id="new", elem_id="tab_new"):
                new_lora_page.build(root)
            with gr.Tab("Jobs", id="jobs", elem_id="tab_jobs"):
                jobs_page.build_jobs(root)
            with gr.Tab("Checkpoints", id="checkpoints", elem_id="tab_checkpoints") as ck_tab:
                load, outs, job_dd = jobs_page.build_checkpoints(root)
        ck_tab.select(load, job_dd, outs)
    return blocks
