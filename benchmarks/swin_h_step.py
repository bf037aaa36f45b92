"""Swin-H (~684M parameters with the decoder) training steps on 2 CPU ranks: ZeRO-3 vs ZeRO-1.

Runs the real pretraining job (deepspeed launcher, gloo, bf16, 224 px, micro-batch 2 per rank,
activation checkpointing, DALI on the demo shards) for a few steps under each ZeRO stage and
compares the per-rank peak memory of the training steps (reset after the engine is built), next to
the planner's prediction. Minutes long, about 10 GB of RAM per rank; not part of CI.

    python benchmarks/swin_h_step.py --shards demo_data/shards --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixmae_scale.atomic_file import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def run_stage(shards: str, stage: int, steps: int, port: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"swin-h-zero{stage}-") as tmp:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               "--module", "mixmae_scale.cli", "pretrain", "--profile", "swin_h", "--run-dir", tmp,
               "--set", f"data.shards={shards}", "--set", f"zero.stage={stage}", "--set", "batch.micro=2",
               "--set", "batch.global_batch=null", "--set", "batch.accumulation=1", "--set", "data.num_threads=1",
               "--set", "logging.every_steps=1", "--set", "logging.heldout_batches=1",
               "--set", "logging.tensorboard=false",
               "--set", "logging.visualize_every_steps=0", "--set", "checkpoint.at_end=false",
               "--set", "data.shuffle_buffer=64", "--max-steps", str(steps)]
        start = time.perf_counter()
        out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"ZeRO-{stage} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {"zero_stage": stage, "steps": summary["steps"], "peak_mib_per_rank": summary["peak_mem_mib_per_rank"],
            "images_per_s": summary["images_per_s"], "wall_s": time.perf_counter() - start}


def main() -> None:
    from mixmae_scale.cluster.plan import plan
    from mixmae_scale.config import load_resolved

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="demo_data/shards")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for stage, port in ((3, 29981), (1, 29982)):
        row = run_stage(args.shards, stage, args.steps, port)
        resolved = load_resolved("swin_h", overrides=[f"zero.stage={stage}", "batch.micro=2", "batch.global_batch=null",
                                                      "batch.accumulation=1"], world_size=2)
        # On the CPU there is no CUDA context; the process baseline (libraries) is part of the measurement.
        predicted = plan(resolved, "swin_h", gpus=2, gpu_mem_gib=1e6, overhead_gib=0.0)
        row["planned_gib"] = predicted.total_gib
        rows.append(row)
        print(json.dumps(row))
    z3, z1 = (max(r["peak_mib_per_rank"]) for r in rows)
    print(f"\nSwin-H, 2 CPU ranks, bf16, micro-batch 2, checkpointing: per-rank peak ZeRO-3 {z3 / 1024:.2f} GiB, "
          f"ZeRO-1 {z1 / 1024:.2f} GiB, ratio {z3 / z1:.2f} (target <= 0.85)")
    for r in rows:
        print(f"  ZeRO-{r['zero_stage']}: measured {max(r['peak_mib_per_rank']) / 1024:.2f} GiB, planned "
              f"{r['planned_gib']:.2f} GiB (model states + activations, no runtime overhead)")
    out = RESULTS / "swin_h_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps({"rows": rows, "ratio_zero3_over_zero1": z3 / z1}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
