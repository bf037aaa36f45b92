#!/usr/bin/env bash
# The README's main command: set up .venv, then run the demo end to end on the built-in demo data.
# Idempotent: a second run reuses the venv and the demo images and shards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MIXMAE=.venv/bin/mixmae
DEMO=${DEMO_DIR:-demo_data}

echo "== 1/3 demo data: procedurally drawn JPEGs in ImageNet layout -> WebDataset shards ($DEMO)"
$MIXMAE shards demo --out "$DEMO"
$MIXMAE shards verify "$DEMO/shards" --decode

echo "== 2/3 the tiny profile, resolved (base -> tiny -> overrides), with its DeepSpeed config"
$MIXMAE config show --profile tiny --set "data.shards=$DEMO/shards" | sed -n '/^derived:/,/^sources:/p'

echo "== 3/3 model sizes: parameters and analytic GFLOPs"
for size in tiny base large huge; do
  $MIXMAE model info --size "$size" --json | .venv/bin/python -c \
    "import json,sys; r=json.load(sys.stdin); print(f\"{r['size']:>6}: {r['encoder_params_with_head']/1e6:7.1f}M params (with 1000-class head), {r['encoder_gflops']:6.1f} encoder GFLOPs at {r['img_size']} px\")"
done
echo "demo outputs: $DEMO/images (JPEG tree), $DEMO/shards (tar shards, dataset.json, classes.json, rejected.jsonl)"
