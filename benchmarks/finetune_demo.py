"""Classification fine-tuning on the demo: from a pretrained demo encoder against from a random init, over seeds
(the seed draws the head's and the random encoder's weights and the data order).

This is what the quickstart's last line suggests running next: `mixmae finetune --profile finetune_tiny` through
the deepspeed launcher on 2 CPU ranks (OMP_NUM_THREADS=1 each), once with `finetune.init=ENCODER` and once with
`finetune.init=random` per seed. It reads each run's summary.json (the last evaluation's top-1 on the 1500
validation images, 10 classes; the best evaluation too, which is chosen on those same images) and writes
results/finetune_demo_cpu_<dtype>.json. A run whose folder in --work already finished is read, not retrained.

The encoder: `--encoder` (a run folder or an export), or `--pretrain-epochs N` (benchmarks/seg_demo.py's
pretraining of the demo profile, N epochs, reused once exported).

    python benchmarks/finetune_demo.py --encoder runs/tiny-demo/encoder.safetensors --demo demo_data --seeds 0 1
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seg_demo import demo_arguments, encoder_record, margins, pretrain_encoder  # noqa: E402  (the same encoder and margins)

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def finetune(run: Path, init: str, demo: Path, seed: int, env: dict, overrides: list[str]) -> float | None:
    """Seconds the launch took, or None when the run had finished before (not retrained)."""
    if (run / "summary.json").exists():
        return None
    start = time.perf_counter()
    subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--module", "mixmae_scale.cli", "finetune",
                    "--profile", "finetune_tiny", "--run-dir", str(run), "--set", f"data.shards={demo / 'shards'}",
                    f"finetune.init={init}", f"run.seed={seed}", *overrides], check=True, env=env,
                   capture_output=True)
    return time.perf_counter() - start


def run_record(run: Path, seconds: float | None) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    last = summary["last"]
    return {"run": run.name, "dtype": summary["dtype"], "steps": summary["steps"], "top1": last["top1"],
            "top5": last["top5"], "val_images": last["samples"], "best_top1": summary["best"]["top1"],
            "images_per_s": summary["images_per_s"], "launch_s": None if seconds is None else round(seconds)}


def main() -> None:
    parser = demo_arguments(__doc__.split("\n\n")[0], "finetune", "runs/finetune_demo_benchmark")
    parser.add_argument("--out", type=Path, default=None,
                        help="the results file (default: results/finetune_demo_cpu_<dtype>.json)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pretraining_env = {**env, "OMP_NUM_THREADS": "2"}  # the demo profile's one process
    encoder = args.encoder or pretrain_encoder(args.work, args.demo, args.pretrain_epochs, pretraining_env)
    runs = []
    for seed in args.seeds:
        record = {"seed": seed}
        for name, init in (("pretrained", str(encoder)), ("random", "random")):
            run = args.work / f"{name}-seed{seed}"
            record[name] = run_record(run, finetune(run, init, args.demo, seed, env, args.overrides))
        runs.append(record)
        pre, rnd = record["pretrained"]["top1"], record["random"]["top1"]
        print(f"seed {seed}: pretrained top-1 {pre:.1f}%, random {rnd:.1f}% (margin {pre - rnd:+.1f} points)")
    summary = margins(runs, "top1")
    print(f"margin over seeds {args.seeds}: {summary['min_margin']:+.1f} to {max(summary['margin_per_seed']):+.1f} "
          f"points; worst pretrained - best random {summary['worst_pretrained_minus_best_random']:+.1f}")
    dtype = runs[0]["pretrained"]["dtype"]
    out = args.out or RESULTS / f"finetune_demo_cpu_{dtype}.json"
    out.write_text(json.dumps({"command": "python benchmarks/finetune_demo.py " + " ".join(sys.argv[1:]),
                               "profile": "finetune_tiny", "overrides": args.overrides,
                               "encoder": encoder_record(encoder), "machine": platform.processor() or
                               platform.machine(), "cpus": os.cpu_count(), "runs": runs, "summary": summary},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
