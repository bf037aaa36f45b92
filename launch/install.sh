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
echo "[install] installing mixmae-scale and its pinned dependencies into .venv (about 2 minutes the first time)"
start=$(date +%s)
# constraints.txt pins every package of ".[dev,cuda13]" (tests/unit/test_packaging.py holds it to pyproject.toml), so
# it is installed as the complete list it is, with nothing for pip's resolver to do (--no-deps; `pip check` below
# still refuses an inconsistent set), then the project itself without an isolated build environment (setuptools and
# wheel are in the list). Bytecode is compiled afterwards on every core instead of file by file.
# pip's warnings about this machine's file:// index locations are noise; pip's exit status still counts.
quiet_pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
quiet_pip install -q --no-deps --no-compile -r constraints.txt
quiet_pip install -q --no-deps --no-build-isolation --no-compile -e .
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check >&2; exit 1; }
.venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true  # a few files of other Pythons don't compile
.venv/bin/python -c "import mixmae_scale, torch, timm, deepspeed, webdataset, nvidia.dali" \
  || { echo "[install] the installed environment does not import; see the pip output above" >&2; exit 1; }
rm -f .venv/.mixmae-installed-*
touch "$stamp"
echo "[install] done in $(( $(date +%s) - start )) s"
