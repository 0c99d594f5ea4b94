"""The web UI (`python -m fluxgym ui`): a Gradio app plus a JSON API over the job engine.

form: the New LoRA settings, checked field by field and by the trainer's own parser; advanced: the
panel built from that parser; uploads: staging uploaded images safely; actions: create a job (dataset +
submit) and read a job's files; api: the JSON routes; pages: the Gradio pages; server: the entry point.
The UI owns no processes: the engine's Worker (hosted by the server) runs and stops every training.
"""
