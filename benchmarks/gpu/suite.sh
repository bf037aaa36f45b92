#!/usr/bin/env bash
# The GPU proof run, one command on a GPU machine without a package index (torch there, nothing else):
# joins and installs the offline wheel kit (fetch_wheels.sh made it here; carry .gpu_kit/part-NN one per
# call), then runs benchmarks/gpu/proof.py. Results: $OUT/gpu_suite.json (or benchmarks/results/gpu/).
#   bash benchmarks/gpu/suite.sh            # about 6 minutes on one H100
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${OUT:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
bash benchmarks/gpu/install_wheels.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt"
python3 benchmarks/gpu/proof.py --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS/proof.log"
