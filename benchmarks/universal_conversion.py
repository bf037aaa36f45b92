"""What a resume on another number of GPUs costs: converting a checkpoint to DeepSpeed's universal form.

For each size: trains one step on 2 CPU ranks (ZeRO-2, fp32, the real `mixmae pretrain` through the deepspeed
launcher, demo shards at the model's image size), then times `engine/checkpointing/universal.py`'s conversion of that
checkpoint (DeepSpeed's ds_to_universal in a subprocess, as a resume runs it) and the size of what it writes,
and finally resumes the run on 1 rank for one more step and reads the conversion note from its log. This is
the price of converting at resume time; writing the universal form beside every checkpoint would pay it at
every save. Prints a table, writes results/universal_conversion.json.

    python benchmarks/universal_conversion.py --sizes tiny base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMG = {"tiny": 96, "base": 224, "large": 224, "huge": 224}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pretrain(run: Path, shards: Path, size: str, ranks: int, steps: int) -> str:
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--module", "mixmae_scale.cli",
               "pretrain", "--profile", "tiny", "--run-dir", str(run), "--max-steps", str(steps), "--set",
               f"data.shards={shards}", f"model.size={size}", f"model.img_size={IMG[size]}", "batch.micro=2",
               "batch.global_batch=4", "zero.stage=2", "precision.dtype=fp32", "logging.heldout_batches=0",
               "logging.visualize_every_steps=0", "logging.every_steps=1", "data.shuffle_buffer=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
    if result.returncode:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    return result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(IMG))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-universal-bench")
    args = parser.parse_args()
    from mixmae_scale.engine.checkpointing.universal import convert_to_universal
    from mixmae_scale.shards.convert import ConvertOptions, convert
    from mixmae_scale.shards.demo import build_demo_images

    shards = args.work / "shards"
    if not (shards / "dataset.json").exists():
        build_demo_images(args.work / "images", train_per_class=4, val_per_class=2, seed=0)
        convert(args.work / "images", shards, ConvertOptions(layout="imagenet", samples_per_shard=16, shard_bytes=None))
    rows = []
    for size in args.sizes:
        run = args.work / f"run-{size}"
        shutil.rmtree(run, ignore_errors=True)
        pretrain(run, shards, size, ranks=2, steps=1)
        checkpoints = run / "checkpoints"
        tag = "step00000001"
        start = time.perf_counter()
        converted = convert_to_universal(checkpoints, tag)
        seconds = time.perf_counter() - start
        params = sum(1 for _ in (converted / "zero").iterdir())
        shutil.rmtree(converted)  # the resume below converts again and reports its own time
        log = pretrain(run, shards, size, ranks=1, steps=2)
        found = re.search(r"converted in ([0-9.]+) s", log)
        rows.append({"size": size, "img_size": IMG[size], "checkpoint_mb": folder_bytes(checkpoints / tag) / 1e6,
                     "universal_mb": folder_bytes(checkpoints / f"{tag}.universal") / 1e6, "parameters": params,
                     "convert_s": seconds, "convert_s_in_resume": float(found.group(1)) if found else None,
                     "resumed": "resumed from" in log})
    print("\nconversion of a 2-rank ZeRO-2 fp32 checkpoint to the universal form (ds_to_universal, 2 workers), CPU")
    print(f"{'size':>6} {'checkpoint MB':>14} {'universal MB':>13} {'convert s':>10} {'in resume s':>12} "
          f"{'resumed':>8}")
    for row in rows:
        again = f"{row['convert_s_in_resume']:.1f}" if row["convert_s_in_resume"] else "-"
        print(f"{row['size']:>6} {row['checkpoint_mb']:>14.0f} {row['universal_mb']:>13.0f} {row['convert_s']:>10.1f} "
              f"{again:>12} {str(row['resumed']):>8}")
    from mixmae_scale.atomic_file import write_text

    result = {"benchmark": "universal_conversion", "date": time.strftime("%Y-%m-%d"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / "universal_conversion.json", json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'universal_conversion.json'}")


if __name__ == "__main__":
    main()
