#!/usr/bin/env bash
# Issue 41's GPU iso-FLOP study (docs/scaling-example/gpu-iso-flop/) in one device call: installs the offline
# wheel kit (its pieces carried as for suite.sh), draws the demo shards, runs the sweep until TOTAL_S seconds after
# the start less REPORT_S (its budgets from the smallest, so a cut leaves whole iso-FLOP curves), then fits and
# reports what finished. Everything lands in $OUT: results.jsonl (copied every 10 s while the sweep runs), fit.json,
# report.md and figures, the sweep's log, every run's metrics.csv and summary.json (runs.tar.gz: images/s and data
# wait per run, to explain a slow study), the card.
#   OUT=/tmp/out TOTAL_S=570 bash benchmarks/gpu/iso_flop.sh      # one call with timeout_s=600
# A cut study resumes: the same command where its run folder is skips what finished and resumes what was stopped.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${OUT:-runs/gpu-iso-flop-out}
RUNS=${RUNS:-runs/gpu-iso-flop}
mkdir -p "$RESULTS" "$RUNS"
started=$SECONDS
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
if ! python3 -c "import deepspeed, nvidia.dali" 2>/dev/null; then   # a warm machine has the kit in /tmp/site
  bash benchmarks/gpu/install_wheels.sh || exit 1
fi
SPEC=${SPEC:-docs/scaling-example/gpu-iso-flop/sweep.yaml}   # another spec: a CPU trial of this script
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$RESULTS/gpu.txt"
[ -f demo_data/shards/dataset.json ] || python3 -m mixmae_scale.cli shards demo --out demo_data --workers 8 \
  > "$RESULTS/demo.log" 2>&1 || { tail -20 "$RESULTS/demo.log"; exit 1; }
deadline=$(( ${TOTAL_S:-570} - ${REPORT_S:-45} - (SECONDS - started) ))
echo "set-up took $((SECONDS - started)) s; the sweep gets $deadline s"
if [ "$deadline" -lt 60 ]; then   # `timeout 0` would mean no limit at all
  echo "not enough of TOTAL_S left for the sweep ($deadline s): run again with a larger TOTAL_S" >&2
  exit 1
fi
(while sleep 10; do cp "$RUNS/results.jsonl" "$RESULTS/" 2>/dev/null; done) &
copier=$!
# timeout signals the sweep's whole process group, its workers too: a run cut short stops (its checkpoint kept)
# and is not recorded; results.jsonl holds whole lines of finished runs only (appended and fsync'd one by one).
timeout -k 15 "$deadline" python3 -m mixmae_scale.cli scaling run "$SPEC" \
  --out "$RUNS" --parallel "${PARALLEL:-8}" --runs-per-process 50 > "$RESULTS/sweep.log" 2>&1
echo "sweep exit $? after $((SECONDS - started)) s" | tee -a "$RESULTS/sweep.log"
kill "$copier" 2>/dev/null
grep -E "run\(s\) at a time|^sweep:|failed" "$RESULTS/sweep.log" | head -20
cp "$RUNS/results.jsonl" "$RESULTS/" 2>/dev/null || echo "no run finished"
(cd "$RUNS" && tar -czf "$RESULTS/runs.tar.gz" runs/*/metrics.csv runs/*/summary.json 2>/dev/null)
python3 -m mixmae_scale.cli scaling report --out "$RUNS" > "$RESULTS/report.log" 2>&1 && \
  cp "$RUNS"/report/* "$RUNS/fit.json" "$RESULTS/" 2>/dev/null
tail -5 "$RESULTS/report.log"
echo "done in $((SECONDS - started)) s"
