#!/usr/bin/env bash
# The README's main command: set up .venv, then run the whole demo on the built-in demo data:
# demo shards -> MixMAE pretraining of the demo profile (the tiny Swin, 810 steps of 16 images) through the deepspeed
# launcher -> export -> linear and k-NN probes of the pretrained encoder against five randomly initialised ones.
# Idempotent: a second run reuses the venv and the demo shards, and resumes or re-reports the run.
# On a machine with GPUs the launcher uses all of them; without, one CPU process on every core, which on a 2-core
# CPU stepped faster than two single-threaded ranks (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
MIXMAE=.venv/bin/mixmae
DEMO=${DEMO_DIR:-demo_data}
RUN=${RUN_DIR:-runs/tiny-demo}

echo "== 1/4 demo data: 10 classes told apart by shape and layout only (colours, sizes, positions drawn"
echo "   independently of the class), procedurally drawn JPEGs in ImageNet layout -> WebDataset shards ($DEMO)"
OMP_NUM_THREADS=1 $MIXMAE shards demo --out "$DEMO"
$MIXMAE shards verify "$DEMO/shards"

# Asking torch costs ~3.5 s of imports on a 2-core CPU: only where a driver is installed (nvidia-smi) is it asked.
if command -v nvidia-smi >/dev/null 2>&1 \
    && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  RANKS=()                 # every visible GPU
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  GPUS=$(nvidia-smi -L | wc -l)
  if [[ $GPUS -eq 1 ]]; then GPUS="1 GPU"; else GPUS="$GPUS GPUs"; fi
  echo "== 2/4 pretraining the demo profile on $GPUS (deepspeed launcher)"
else
  RANKS=(--num_gpus 1)     # one CPU process using every core: faster here than one rank per core
  export DS_ACCELERATOR=cpu  # said here once, instead of a warning from every DeepSpeed process
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  echo "== 2/4 pretraining the demo profile: 810 steps in one CPU process with $OMP_NUM_THREADS threads" \
    "(deepspeed launcher; a few minutes on 2 cores)"
fi
.venv/bin/deepspeed ${RANKS[@]+"${RANKS[@]}"} --master_port "${MASTER_PORT:-29555}" --module mixmae_scale.cli pretrain \
  --profile demo --run-dir "$RUN" --set "data.shards=$DEMO/shards" "$@"

echo "== 3/4 export: gathering the ZeRO shards into one safetensors file"
$MIXMAE export "$RUN" --out "$RUN/encoder.safetensors"

echo "== 4/4 probes on the demo classes (1500 validation images): the pretrained encoder vs five randomly initialised ones"
$MIXMAE probe --init "$RUN/encoder.safetensors" --data "$DEMO/shards" --baseline --baseline-seeds 5
echo
echo "outputs:"
echo "  $DEMO/shards                 demo shards (dataset.json, classes.json, rejected.jsonl)"
echo "  $RUN/config.yaml   resolved configuration and DeepSpeed config"
echo "  $RUN/metrics.csv   loss, lr, grad norm, images/s, memory per logged step"
echo "  $RUN/summary.json  held-out reconstruction loss at step 0 and at the end, throughput, memory"
echo "  $RUN/checkpoints/  DeepSpeed checkpoints (resume: run this command again after a stop)"
echo "  $RUN/encoder.safetensors  the pretrained encoder, loadable without DeepSpeed"
# The next step as one line that can be pasted anywhere as printed: its folder, its environment (DS_ACCELERATOR on a
# CPU), its port, and this demo's data and encoder.
NEXT=$(printf '%q ' .venv/bin/deepspeed ${RANKS[@]+"${RANKS[@]}"} --master_port "${MASTER_PORT:-29555}" --module mixmae_scale.cli \
  finetune --profile finetune_tiny --set "data.shards=$DEMO/shards" "finetune.init=$RUN/encoder.safetensors")
# The random-init baseline gets its own run folder: in the first one's, the finished run would only say so.
RANDOM_INIT=$(printf '%q ' .venv/bin/deepspeed ${RANKS[@]+"${RANKS[@]}"} --master_port "${MASTER_PORT:-29555}" --module \
  mixmae_scale.cli finetune --profile finetune_tiny --run-dir runs/tiny-finetune-random --set "data.shards=$DEMO/shards" \
  "finetune.init=random")
if [ -n "${DS_ACCELERATOR:-}" ]; then
  NEXT="DS_ACCELERATOR=$DS_ACCELERATOR OMP_NUM_THREADS=$OMP_NUM_THREADS $NEXT"
  RANDOM_INIT="DS_ACCELERATOR=$DS_ACCELERATOR OMP_NUM_THREADS=$OMP_NUM_THREADS $RANDOM_INIT"
fi
echo "next: fine-tune it with (10 epochs, a few minutes)"
echo "  cd $(printf %q "$PWD") && ${NEXT% }"
echo "and from a random init, in a run folder of its own (on the demo the random init fine-tunes better:"
echo "docs/training.md, 'Fine-tuning on the demo'; the probes above are what shows pretraining here):"
echo "  cd $(printf %q "$PWD") && ${RANDOM_INIT% }"
