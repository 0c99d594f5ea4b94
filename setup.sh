#!/usr/bin/env bash
# One-time (and idempotent) set-up: a project virtual environment with pinned packages, then the
# embedded demo (tiny FLUX-architecture weights, a small dataset and outputs/demo/train.sh).
# Safe to re-run: every step checks what is already there. Needs no network except PyPI.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

# torch first and pinned: any unpinned torch requirement resolved before it pulls several GB of CUDA.
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    "$VPY" -m pip install -q torch==2.13.0
fi

REQ_HASH="$(sha256sum requirements.txt | cut -c1-16)"
if [ "$(cat .venv/.requirements-hash 2>/dev/null || true)" != "$REQ_HASH" ]; then
    echo "[setup] installing pinned requirements"
    "$VPY" -m pip install -q -r requirements.txt
    # Only the CLIP BPE vocabulary is used from open_clip; its dependencies (torchvision, timm)
    # would pull a CUDA torch, so it is installed without them.
    "$VPY" -m pip install -q --no-deps open_clip_torch==3.3.0
    echo "$REQ_HASH" > .venv/.requirements-hash
fi

echo "[setup] building the embedded demo (models/, datasets/demo, outputs/demo)"
"$VPY" -m fluxgym demo --root "$ROOT"
echo "[setup] done. Train the demo LoRA with: bash outputs/demo/train.sh"
