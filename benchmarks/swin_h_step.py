"""Swin-H (~684M parameters with the decoder) training steps on 2 CPU ranks: ZeRO-3 vs ZeRO-1.

Runs the real pretraining job (deepspeed launcher, gloo, bf16, 224 px, micro-batch 2 per rank,
activation checkpointing, DALI on the demo shards) for a few steps under each ZeRO stage and
compares the per-rank peak memory of the training steps (reset after the engine is built), next to
the planner's prediction. Rows: ZeRO-3 with ds_configs/zero3.json, ZeRO-1, and ZeRO-3 with
DeepSpeed's own limits (1e9 live parameters, reuse distance and sub-group), which is what the
shipped file improves on. Minutes long, up to about 10 GB of RAM per rank; not part of CI.

The ranks run with glibc's mmap threshold fixed at 1 MiB. By default glibc raises that threshold
as large blocks are freed, after which freed multi-megabyte tensors stay in the heap: in a probe of
this step that held 1.5-2 GB per rank of RSS that nothing used, enough to get a rank OOM-killed on a
24 GB machine.

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


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}
DEEPSPEED_LIMITS = ("deepspeed.zero_optimization.stage3_max_live_parameters=1000000000",
                    "deepspeed.zero_optimization.stage3_max_reuse_distance=1000000000",
                    "deepspeed.zero_optimization.sub_group_size=1000000000")
COMMON = ("model.checkpoint_every=1", "batch.micro=2", "batch.global_batch=null", "batch.accumulation=1")


def process_baseline_gib() -> float:
    """RSS of a process that has imported what a rank imports: the CPU's stand-in for the planner's
    runtime overhead (CUDA context and allocator slack on GPUs)."""
    code = ("import torch, deepspeed, nvidia.dali, mixmae_scale.pretrain.job\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **MALLOC_ENV})
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def run_stage(shards: str, stage: int, steps: int, port: int, extra: tuple[str, ...]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"swin-h-zero{stage}-") as tmp:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               "--module", "mixmae_scale.cli", "pretrain", "--profile", "swin_h", "--run-dir", tmp,
               "--set", f"data.shards={shards}", "--set", f"zero.stage={stage}", "--set", "data.num_threads=1",
               "--set", "logging.every_steps=1", "--set", "logging.heldout_batches=1",
               "--set", "logging.tensorboard=false",
               "--set", "logging.visualize_every_steps=0", "--set", "checkpoint.at_end=false",
               "--set", "data.shuffle_buffer=64", "--max-steps", str(steps)]
        for item in (*COMMON, *extra):
            cmd += ["--set", item]
        start = time.perf_counter()
        out = subprocess.run(cmd, env={**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True)
        if out.returncode and not extra:
            raise RuntimeError(f"ZeRO-{stage} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        if out.returncode:  # the comparison row may not fit in this machine's memory: say so, keep the rest
            killed = "exits with return code = -9" in out.stdout + out.stderr
            for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # killed ranks' RAM
                leftover.unlink(missing_ok=True)
            return {"zero_stage": stage, "settings": list(extra), "failed": "killed (out of memory)" if killed
                    else f"exit {out.returncode}: {(out.stdout + out.stderr)[-500:]}"}
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {"zero_stage": stage, "settings": list(extra) or "ds_configs", "steps": summary["steps"],
            "peak_mib_per_rank": summary["peak_mem_mib_per_rank"],
            "images_per_s": summary["images_per_s"], "wall_s": time.perf_counter() - start}


def main() -> None:
    from mixmae_scale.cluster.plan import plan
    from mixmae_scale.config import load_resolved

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="demo_data/shards")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-deepspeed-limits", action="store_true", help="leave out the third row")
    args = parser.parse_args()
    baseline = process_baseline_gib()
    configs = [(3, 29981, ()), (1, 29982, ())]
    if not args.skip_deepspeed_limits:
        configs.append((3, 29983, DEEPSPEED_LIMITS))
    rows = []
    for stage, port, extra in configs:
        row = run_stage(args.shards, stage, args.steps, port, extra)
        resolved = load_resolved("swin_h", overrides=[f"zero.stage={stage}", *COMMON, *extra], world_size=2)
        predicted = plan(resolved, "swin_h", gpus=2, gpu_mem_gib=1e6, overhead_gib=baseline, fused_optimizer=False)
        row.update(planned_gib=predicted.total_gib, planned_components_gib=predicted.components_gib,
                   planned_peak_phase=predicted.peak_phase)
        if "failed" not in row:
            row["planned_over_measured"] = predicted.total_gib * 1024 / max(row["peak_mib_per_rank"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    z3, z1 = (max(r["peak_mib_per_rank"]) for r in rows[:2])
    print(f"\nSwin-H, 2 CPU ranks, bf16, micro-batch 2, checkpointing, {args.steps} steps; process baseline "
          f"{baseline:.2f} GiB")
    print(f"{'config':<34}{'peak GiB/rank':>14}{'planned GiB':>13}{'planned/measured':>18}{'img/s':>8}")
    for r in rows:
        name = f"ZeRO-{r['zero_stage']}" + (" (DeepSpeed's limits)" if r["settings"] != "ds_configs" else "")
        if "failed" in r:
            print(f"{name:<34}{r['failed']}; planned {r['planned_gib']:.2f} GiB per rank")
            continue
        print(f"{name:<34}{max(r['peak_mib_per_rank']) / 1024:>14.2f}{r['planned_gib']:>13.2f}"
              f"{r['planned_over_measured']:>18.2f}{r['images_per_s'] or 0:>8.2f}")
    print(f"ZeRO-3 / ZeRO-1 per-rank peak: {z3 / z1:.2f} (target <= 0.85)")
    out = RESULTS / "swin_h_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps({"baseline_gib": baseline, "rows": rows, "ratio_zero3_over_zero1": z3 / z1},
                               indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
