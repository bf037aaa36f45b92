#!/usr/bin/env bash
# Creates .venv and installs the project, its dependencies at the exact versions of constraints.txt (the tested
# CUDA 13 stack; pyproject.toml only gives ranges), DALI's CUDA 13 build and the dev tools.
# Idempotent: a stamp keyed on pyproject.toml, constraints.txt and the venv's Python skips the install when
# nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The pinned stack (numpy, scipy, torch wheels of constraints.txt) needs Python 3.11+: on 3.10 pip's resolver
# failed without naming Python, and the 3.10 .venv it left was reused by every later run.
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ ! -x .venv/bin/python ]; then
  new_enough "$PYTHON" || { echo "[install] $PYTHON is $("$PYTHON" --version 2>&1): the pinned stack" \
    "(constraints.txt) needs Python 3.11 or newer; run again with PYTHON=python3.11 (or a newer one)" >&2; exit 1; }
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
new_enough .venv/bin/python || { echo "[install] .venv has $(.venv/bin/python --version 2>&1); the pinned stack" \
  "needs Python 3.11 or newer: remove it (rm -rf .venv) and run again with PYTHON=python3.11 (or a newer one)" >&2
  exit 1; }
stamp=".venv/.mixmae-installed-$( (cat pyproject.toml constraints.txt; .venv/bin/python --version) | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[install] .venv is up to date ($stamp)"
  exit 0
fi
echo "[install] installing mixmae-scale and its pinned dependencies into .venv (about 2.5 minutes the first time on a 2-core CPU)"
start=$(date +%s)
# pip's warnings about this machine's file:// index locations are noise; pip's exit status still counts.
# `-c` does not reach the isolated environment where pip builds this package (pyproject.toml's build-system:
# setuptools, wheel), which would take the newest; PIP_CONSTRAINT does, so the build backend is pinned too.
PIP_CONSTRAINT="$PWD/constraints.txt" .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,cuda13]" 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/python -c "import mixmae_scale, torch, timm, deepspeed, webdataset, nvidia.dali" \
  || { echo "[install] the installed environment does not import; see the pip output above" >&2; exit 1; }
rm -f .venv/.mixmae-installed-*
touch "$stamp"
echo "[install] done in $(( $(date +%s) - start )) s"
