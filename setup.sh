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
    # gradio caps pillow<13; its dependencies are pinned in requirements.txt, so install it alone.
    "$VPY" -m pip install -q --no-deps gradio==6.31.0
    echo "$REQ_HASH" > .venv/.requirements-hash
fi

# The browser tests (tests/ui) drive Debian's chromium through Playwright; Playwright's own browser
# download is not used (it needs network access the tests must not have).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing chromium (apt-get) for the web UI browser tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    else
        echo "[setup] warning: /usr/bin/chromium is missing; the browser tests need it:" >&2
        echo "        sudo apt-get update && sudo apt-get install -y chromium" >&2
    fi
fi

echo "[setup] building the embedded demo (models/, datasets/demo, outputs/demo)"
"$VPY" -m fluxgym demo --root "$ROOT"
echo "[setup] done. Start the web UI with: .venv/bin/python -m fluxgym ui   (then open http://127.0.0.1:7860)"
echo "        or train the demo LoRA from the shell: bash outputs/demo/train.sh"
