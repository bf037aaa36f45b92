"""The dense probe's evidence on the demo: demo pretraining runs (one per training seed) against random encoders,
read per pixel on the demo's masks (`mixmae probe --dense`), in one process so the splits are decoded once.

Each run folder must hold a finished demo pretraining (the quickstart's command, or benchmarks/demo_probe.py's
--work folder); the random encoders do not depend on the training seed and are probed once. Writes
results/demo_dense_probe_cpu_<dtype>.json: per run, mIoU and pixel accuracy, the margin over the random
encoders' mean in units of their spread, and the seconds each encoder's probe took (encoding both splits and
the fit). `--check-iterations` also fits the first run's read-out with 100 L-BFGS iterations instead of the
default 300, to show what a shorter fit gives up.

    python benchmarks/demo_dense_probe.py --demo demo_data --runs runs/seed0 runs/seed1 --baseline-seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="the demo folder (`mixmae shards demo --out`)")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="demo pretraining run folders")
    parser.add_argument("--baseline-seeds", type=int, default=5)
    parser.add_argument("--loader", default="dali")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-iterations", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_dense_probe_cpu_fp32.json")
    args = parser.parse_args()
    if args.baseline_seeds < 2:  # the margin is read in units of the random encoders' spread, which one has not
        parser.error(f"--baseline-seeds {args.baseline_seeds}: at least 2 random encoders give a spread to read "
                     "the margin in")

    import dataclasses

    from mixmae_scale.finetune import dense_probe
    from mixmae_scale.finetune.dense_probe import build_backbone, load_splits, probe_backbone
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import readout_margin

    shards = str(args.demo / "shards")
    states = [load_encoder(run, "--runs") for run in args.runs]
    arch = states[0][1]
    start = time.perf_counter()
    train, val = load_splits(shards, arch["img_size"], 64, args.loader, args.threads)
    decode_s = time.perf_counter() - start
    classes = 11
    randoms = [probe_backbone(build_backbone(None, arch, 1 + i), train, val, classes)
               for i in range(args.baseline_seeds)]
    runs = []
    for run, (state, _) in zip(args.runs, states, strict=True):
        result = probe_backbone(build_backbone(state, arch, 0), train, val, classes)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        record = {"run": str(run), "steps": summary.get("steps"), "seed": summary.get("seed"),
                  "pretrained": dataclasses.asdict(result)}
        for measure in ("miou", "pixel_accuracy"):
            record[measure] = readout_margin(getattr(result, measure), [getattr(r, measure) for r in randoms])
        runs.append(record)
        print(f"{run}: mIoU {result.miou:.1f}% (margin {record['miou']['margin']:+.1f}, "
              f"{record['miou']['margin_in_spread']:.1f}x the random encoders' spread), {result.seconds:.0f} s")
    report = {"what": "the dense probe (`mixmae probe --dense`, benchmarks/demo_dense_probe.py): per-pixel linear "
                      "read-out of the frozen feature maps on the demo's masks (11 classes: background + 10 figures), "
                      f"{len(train.images)} train / {len(val.images)} val images, demo pretraining runs against "
                      f"{args.baseline_seeds} random encoders",
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": _threads(),
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "decode_both_splits_s": decode_s,
              "fit_iterations": dense_probe.FIT_ITERATIONS,
              "random_init": [dataclasses.asdict(r) for r in randoms], "runs": runs}
    if args.check_iterations:
        dense_probe.FIT_ITERATIONS = 100
        shorter = probe_backbone(build_backbone(states[0][0], arch, 0), train, val, classes)
        report["first_run_with_100_iterations"] = dataclasses.asdict(shorter)
        print(f"100 iterations: mIoU {shorter.miou:.1f}% in {shorter.seconds:.0f} s")
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
