#!/usr/bin/env bash
# The offline wheel kit for a GPU machine without a package index (Python 3.12, manylinux x86_64, torch
# already installed there): DALI with its codec libraries, DeepSpeed, and the small pure-Python
# dependencies, at the versions of constraints.txt. The kit is split into pieces of at most 45 MiB
# (split_kit.sh) in separate git-ignored folders .gpu_kit/part-NN/, so that each fits one transfer next to
# the working tree (64 MiB in all); benchmarks/gpu/install_wheels.sh joins and installs them there.
#   bash benchmarks/gpu/fetch_wheels.sh            # about 280 MB, 7 pieces
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${KIT:-.gpu_kit}
PY=${PYTHON:-.venv/bin/python}
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
rm -rf "$KIT/wheels" "$KIT"/part-*
mkdir -p "$KIT/wheels"
pin() { grep -ix "$1==[^ ]*" constraints.txt; }  # the locked version (pyproject.toml has ranges)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
# DALI pulls nvimgcodec, nvcomp, nvjpeg and its small helpers; torch is already on the GPU machine.
"$PY" -m pip download -q "${platform[@]}" -d "$KIT/wheels" "$(pin nvidia-dali-cuda130)" "$(pin webdataset)" \
  "$(pin safetensors)" "$(pin pyyaml)" hjson ninja nvidia-ml-py psutil py-cpuinfo "pydantic>=2" msgpack einops tqdm
# DeepSpeed is published as a source archive: build its pure-Python wheel here (ops compile there on use).
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$(pin deepspeed)" -w "$KIT/wheels"
bash benchmarks/gpu/split_kit.sh "$KIT"
