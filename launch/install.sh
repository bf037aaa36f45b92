#!/usr/bin/env bash
# Creates .venv and installs the project, its dependencies at the exact versions of constraints.txt (the tested
# CUDA 13 stack; pyproject.toml only gives ranges), DALI's CUDA 13 build and the dev tools.
# Idempotent: a stamp keyed on pyproject.toml and constraints.txt skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.mixmae-installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[install] .venv is up to date ($stamp)"
  exit 0
fi
echo "[install] installing mixmae-scale and its pinned dependencies into .venv (about 2.5 minutes the first time on a 2-core CPU)"
start=$(date +%s)
# pip's warnings about this machine's file:// index locations are noise; pip's exit status still counts.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,cuda13]" 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/python -c "import mixmae_scale, torch, timm, deepspeed, webdataset, nvidia.dali" \
  || { echo "[install] the installed environment does not import; see the pip output above" >&2; exit 1; }
rm -f .venv/.mixmae-installed-*
touch "$stamp"
echo "[install] done in $(( $(date +%s) - start )) s"
