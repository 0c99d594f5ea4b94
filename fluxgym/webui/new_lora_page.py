"""The "New LoRA" tab: FluxGym's three steps (settings, dataset, train) plus the Advanced panel.

Every change re-renders the expected step count and the read-only train.sh / dataset.toml preview
through the same checks Start uses (form + trainer parser), so an error shows before anything queues.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

from fluxgym.models import check_model_files, load_models_yaml, resolve_base_model
from fluxgym.prepare import IMAGE_EXTS, list_images
from fluxgym.presets import load_presets
from fluxgym.webui import actions
from fluxgym.webui.advanced import advanced_flags, extra_from_values, values_from_extra
from fluxgym.webui.form import FieldError, TrainForm, load_settings_file, preflight, settings_file_text
from fluxgym.webui.uploads import stage_uploads

BASIC = ("name", "trigger", "base_model", "vram", "repeats", "epochs", "resolution", "lr", "rank", "seed",
         "workers", "sample_prompts", "sample_every", "checkpointing", "save_every", "keep_last", "images_dir")


def base_model_choices(root: Path) -> list[str]:
    """models.yaml keys, then every .safetensors/.sft under models/unet (as a path)."""
    keys = list(load_models_yaml())
    unet = Path(root) / "models" / "unet"
    found = sorted(str(p) for p in unet.rglob("*") if p.suffix in (".safetensors", ".sft")) if unet.is_dir() else []
    known = {str(resolve_base_model(root, k).unet) for k in keys}
    return keys + [p for p in found if p not in known]


def model_status(root: Path, key: str) -> str:
    try:
        check_model_files(resolve_base_model(root, key))
    except ValueError as exc:
        return "**Model files missing.** Run this on the server:\n\n```\n" + str(exc) + "\n```"
    return "All model files are present."


def preset_reasons(name: str) -> str:
    p = load_presets().get(name)
    if p is None:
        return ""
    rows = [f"**{p.label}**: {p.description}", "", f"- fp8 base {'on' if p.fp8_base else 'off'}, "
            f"mixed precision {p.mixed_precision}: {p.fp8_why}"]
    rows += [f"- `{' '.join(f.args)}`: {f.why}" for f in p.block]
    rows.append(f"- defaults: resolution {p.resolution}, {p.workers} data loader worker(s)")
    return "\n".join(rows)


def _form_from(values: dict, flags, adv_values) -> TrainForm:
    data = {k: values[k] for k in BASIC if k != "images_dir"}
    data["extra"] = extra_from_values(flags, adv_values)
    if data["resolution"] in (None, "", 0):
        data["resolution"] = None  # the preset's
    if data["workers"] in (None, ""):
        data["workers"] = None
    data["lr"] = str(data["lr"])
    return TrainForm.from_mapping(data)


def _image_files(uploads, images_dir: str) -> list[tuple[str, Path]]:
    if uploads:
        return [(Path(getattr(f, "orig_name", None) or getattr(f, "name", f)).name
                 if not isinstance(f, str) else Path(f).name, Path(f if isinstance(f, str) else f.name))
                for f in uploads]
    if images_dir and Path(images_dir).is_dir():
        return [(p.name, p) for p in list_images(Path(images_dir))]
    return []


def caption_rows(uploads, images_dir: str, trigger: str) -> list[list[str]]:
    """One row per image: its name and caption (an uploaded or existing `<image>.txt` wins)."""
    files = _image_files(uploads, images_dir)
    texts = {Path(name).stem: path for name, path in files if Path(name).suffix.lower() == ".txt"}
    rows = []
    for name, path in files:
        if Path(name).suffix.lower() not in IMAGE_EXTS:
            continue
        txt = texts.get(Path(name).stem) or (path.with_suffix(".txt") if path.with_suffix(".txt").is_file() else None)
        caption = Path(txt).read_text(encoding="utf-8", errors="replace").strip() if txt else trigger
        rows.append([name, caption])
    return rows


def build(root: Path) -> None:
    flags = advanced_flags()
    presets = list(load_presets())
    models = base_model_choices(root)
    c: dict = {}
    gr.Markdown("Train a FLUX LoRA: fill in step 1, add images in step 2, press **Start** in step 3. "
                "Progress, stop and resume are on the **Jobs** tab.")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Step 1. LoRA info")
            c["name"] = gr.Textbox(label="The name of your LoRA", info="a unique name", elem_id="lora_name")
            c["trigger"] = gr.Textbox(label="Trigger word/sentence", elem_id="trigger")
            c["base_model"] = gr.Dropdown(models, value=models[0], label="Base model",
                                          info="models.yaml entries and files under models/unet",
                                          allow_custom_value=True, elem_id="base_model")
            model_md = gr.Markdown(model_status(root, models[0]), elem_id="model_status")
            c["vram"] = gr.Radio(presets, value="20G" if "20G" in presets else presets[0], label="VRAM",
                                 elem_id="vram")
            vram_md = gr.Markdown(preset_reasons("20G"), elem_id="preset_reasons")
            with gr.Row():
                c["repeats"] = gr.Number(10, label="Repeat trains per image", precision=0, elem_id="repeats")
                c["epochs"] = gr.Number(16, label="Max train epochs", precision=0, elem_id="epochs")
            steps_md = gr.Markdown("Expected training steps: -", elem_id="expected_steps")
            with gr.Row():
                c["resolution"] = gr.Number(512, label="Resolution (the preset's by default)", precision=0,
                                            elem_id="resolution")
                c["lr"] = gr.Textbox("8e-4", label="Learning rate", elem_id="lr")
            with gr.Row():
                c["rank"] = gr.Number(4, label="LoRA rank (--network_dim)", precision=0, elem_id="rank")
                c["seed"] = gr.Number(42, label="Seed", precision=0, elem_id="seed")
                c["workers"] = gr.Number(2, label="Data loader workers", precision=0, elem_id="workers")
            c["sample_prompts"] = gr.Textbox(label="Sample image prompts (one per line; empty: the trigger)",
                                             lines=3, elem_id="sample_prompts")
            c["sample_every"] = gr.Number(0, label="Sample image every N steps (0: off)", precision=0,
                                          elem_id="sample_every")
            c["checkpointing"] = gr.Checkbox(True, label="Checkpointing (resume after a crash or a stop)",
                                             elem_id="checkpointing")
            with gr.Row():
                c["save_every"] = gr.Number(4, label="Save every N epochs", precision=0, elem_id="save_every")
                c["keep_last"] = gr.Number(2, label="Keep last K checkpoints", precision=0, elem_id="keep_last")
        with gr.Column(scale=1):
            gr.Markdown("### Step 2. Dataset")
            uploads = gr.File(label="Upload your images (and optional .txt captions)", file_count="multiple",
                              file_types=["image", ".txt"], elem_id="uploads", height=280)
            c["images_dir"] = gr.Textbox(label="...or a folder of images on the server", elem_id="images_dir")
            captions = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], column_count=(2, "fixed"),
                                    interactive=True, label="Captions (one per image; edit the right column)",
                                    elem_id="captions")
        with gr.Column(scale=1):
            gr.Markdown("### Step 3. Train")
            start = gr.Button("Start training", variant="primary", elem_id="start_training")
            result = gr.Markdown("", elem_id="start_result")
            with gr.Row():
                save_btn = gr.DownloadButton("Save settings", elem_id="save_settings")
                load_btn = gr.UploadButton("Load settings", file_types=[".json"], elem_id="load_settings")
            train_sh = gr.Code(label="train.sh (read-only preview)", language="shell", interactive=False,
                               elem_id="preview_sh")
            dataset_toml = gr.Code(label="dataset.toml (read-only preview)", interactive=False,
                                   elem_id="preview_toml")
    adv: list = []
    with gr.Accordion("Advanced options (every trainer flag; set values are added after the generated ones)",
                      open=False, elem_id="advanced_options"):
        for group in dict.fromkeys(f.group for f in flags):
            with gr.Accordion(group, open=False):
                for f in (f for f in flags if f.group == group):
                    info = f.help + (f" (default {f.default})" if f.default else "") + \
                        (f" [choices: {', '.join(f.choices)}]" if f.choices else "")
                    elem = "adv" + f.flag.replace("-", "_")
                    adv.append(gr.Checkbox(False, label=f.flag, info=info, elem_id=elem) if f.switch
                               else gr.Textbox("", label=f.flag, info=info, elem_id=elem))

    basic = [c[k] for k in BASIC]

    def unpack(args):
        return dict(zip(BASIC, args[:len(BASIC)])), list(args[len(BASIC):len(BASIC) + len(adv)])

    def refresh(*args):
        values, adv_values = unpack(args)
        rows = args[-1]
        n = len(rows) if rows is not None and hasattr(rows, "__len__") else 0
        if values["images_dir"] and not n:
            n = len(caption_rows(None, values["images_dir"], ""))
        try:
            form = _form_from(values, flags, adv_values)
            pre = preflight(form, root)
        except FieldError as exc:
            return (f"Expected training steps: - \n\n**Fix `{exc.field}`:** {exc}", "", "")
        steps = n * form.repeats * form.epochs
        text = (f"Expected training steps: **{steps}** ({n} images x {form.repeats} repeats x {form.epochs} epochs)"
                if n else "Expected training steps: add images to compute")
        return text, pre.files["train.sh"], pre.files["dataset.toml"]

    inputs = basic + adv + [captions]
    outs = [steps_md, train_sh, dataset_toml]
    for comp in basic + adv:
        comp.change(refresh, inputs, outs, show_progress="hidden")
    captions.change(refresh, inputs, outs, show_progress="hidden")
    c["base_model"].change(lambda k: model_status(root, k), c["base_model"], model_md, show_progress="hidden")
    def on_vram(name):
        p = load_presets().get(name)
        return preset_reasons(name), (p.resolution if p else gr.update()), (p.workers if p else gr.update())

    # A preset brings its own resolution and worker count (the user may change them afterwards).
    c["vram"].change(on_vram, c["vram"], [vram_md, c["resolution"], c["workers"]], show_progress="hidden")
    uploads.change(lambda u, t: caption_rows(u, "", t), [uploads, c["trigger"]], captions, show_progress="hidden")
    c["images_dir"].submit(lambda d, t: caption_rows(None, d, t), [c["images_dir"], c["trigger"]], captions)
    c["images_dir"].blur(lambda d, t: caption_rows(None, d, t), [c["images_dir"], c["trigger"]], captions)

    def on_start(*args):
        values, adv_values = unpack(args)
        rows, files = args[-2], args[-1]
        try:
            form = _form_from(values, flags, adv_values)
            image_files = _image_files(files, values["images_dir"])
            image_files = [(n, p) for n, p in image_files if Path(n).suffix.lower() != ".txt"]
            caps = {str(r[0]): str(r[1]) for r in (rows.values.tolist() if hasattr(rows, "values") else rows or [])}
            staged = stage_uploads(root, image_files, caps) if image_files else None
            job = actions.create_job(root, form, staged)
        except FieldError as exc:
            return f"**Not started. Fix `{exc.field}`:** {exc}"
        return (f"**Job {job['id']} queued** for LoRA `{job['lora']}` ({job['total_steps']} steps). "
                "Follow it on the **Jobs** tab.")

    start.click(on_start, inputs[:-1] + [captions, uploads], result, concurrency_limit=1)

    def on_save(*args):
        values, adv_values = unpack(args)
        try:
            form = _form_from(values, flags, adv_values)
        except FieldError as exc:
            raise gr.Error(f"{exc.field}: {exc}")
        out = Path(tempfile.mkdtemp(prefix="fluxgym-settings-")) / f"{form.name or 'lora'}-settings.json"
        out.write_text(settings_file_text(form), encoding="utf-8")
        return str(out)

    save_btn.click(on_save, basic + adv, save_btn)

    def on_load(file):
        try:
            form = load_settings_file(Path(file if isinstance(file, str) else file.name).read_text(encoding="utf-8"))
        except (FieldError, OSError) as exc:
            raise gr.Error(str(exc))
        adv_values, rest = values_from_extra(flags, form.extra)
        d = form.to_json()
        if rest:
            gr.Warning("not shown in the panel and dropped: " + json.dumps(rest))
        return [d.get(k, "") if k != "images_dir" else d["images_dir"] for k in BASIC] + adv_values

    load_btn.upload(on_load, load_btn, basic + adv)
