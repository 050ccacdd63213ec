#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment with the project and its test tools.
# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml and constraints.txt (see README "Quickstart").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -c "import torch, torchvision, transformers, ray, qdrant_client, decord; print('set-up ok: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
