"""Segmentation fine-tuning on the demo's masks: from a pretrained demo encoder against from a random init, over
seeds (the seed draws the head's and the random encoder's weights and the crops' order).

Runs `mixmae segment --profile seg_demo` through the deepspeed launcher in one CPU process per run (precision
auto, OMP_NUM_THREADS=2), once with `--init ENCODER` and once with `--init random` per seed, reads each run's
summary.json (the last evaluation's mIoU on the 1500 validation images, 11 classes: the background and the ten
figures) and writes results/seg_demo_cpu_<dtype>.json. A run whose folder in --work already finished is read, not
retrained, so the seeds can be run a few at a time.

The encoder: `--encoder` (a run folder or an export), or `--pretrain-epochs N`, which pretrains the demo profile
for N epochs (162 steps each) into WORK/encoder-<N>ep and exports it (once: a later call reuses the export). The
quickstart's encoder is the demo profile's 5 epochs; 20 epochs (about 8 minutes on 2 cores) is what the figures
in docs/dense.md were measured with. The encoder's pretraining (steps, held-out loss) goes into the results.

    python benchmarks/seg_demo.py --pretrain-epochs 20 --demo demo_data --seeds 0 1 2 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def segment(run: Path, init: str, demo: Path, seed: int, env: dict, overrides: list[str]) -> float | None:
    """Seconds the launch took, or None when the run had finished before (not retrained)."""
    if (run / "summary.json").exists():
        return None
    start = time.perf_counter()
    subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "1", "--module", "mixmae_scale.cli", "segment",
                    "--profile", "seg_demo", "--init", init, "--run-dir", str(run), "--set",
                    f"data.shards={demo / 'shards'}", f"run.seed={seed}", *overrides], check=True, env=env,
                   capture_output=True)
    return time.perf_counter() - start


def pretrain_encoder(work: Path, demo: Path, epochs: int, env: dict) -> Path:
    """The demo profile pretrained for `epochs` and exported (reused when its export exists; an interrupted
    pretraining resumes from its last checkpoint, as any run folder does)."""
    run = work / f"encoder-{epochs}ep"
    export = run / "encoder.safetensors"
    if export.exists():
        return export
    warmup = max(1, epochs // 10)  # the profile's 1 of 5 epochs, 2 of 20
    subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "1", "--module", "mixmae_scale.cli", "pretrain",
                    "--profile", "demo", "--run-dir", str(run), "--set", f"data.shards={demo / 'shards'}",
                    f"schedule.epochs={epochs}", f"schedule.warmup_epochs={warmup}"], check=True, env=env,
                   capture_output=True)
    subprocess.run([str(BIN / "mixmae"), "export", str(run), "--out", str(export)], check=True, env=env,
                   capture_output=True)
    return export


def encoder_record(encoder: Path) -> dict:
    """What the encoder's pretraining was, read from its run folder (the export's folder, or the folder named)."""
    run = encoder if encoder.is_dir() else encoder.parent
    record: dict = {"path": str(encoder)}
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        record.update({key: summary.get(key) for key in ("steps", "images_seen", "dtype", "heldout_loss_start",
                                                          "heldout_loss_end", "wall_s")})
    return record


def run_record(run: Path, seconds: float | None) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    last = summary["last"]
    return {"run": run.name, "dtype": summary["dtype"], "steps": summary["steps"], "miou": last["miou"],
            "pixel_accuracy": last["pixel_accuracy"], "val_images": last["samples"],
            "per_class_iou": last["per_class_iou"], "best_miou": summary["best"]["miou"],
            "images_per_s": summary["images_per_s"], "launch_s": None if seconds is None else round(seconds)}


def margins(runs: list[dict], metric: str = "miou") -> dict:
    """Per seed pretrained - random (the last evaluation's `metric`), and the smallest margin against the random
    runs' spread. benchmarks/finetune_demo.py uses it for top-1."""
    pre = [r["pretrained"][metric] for r in runs]
    rnd = [r["random"][metric] for r in runs]
    per_seed = [p - q for p, q in zip(pre, rnd, strict=True)]
    spread = statistics.stdev(rnd) if len(rnd) > 1 else None
    return {f"pretrained_{metric}": pre, f"random_{metric}": rnd, "margin_per_seed": per_seed,
            "min_margin": min(per_seed),
            "margin_mean": statistics.mean(per_seed), "random_spread": spread,
            "min_margin_in_random_spreads": min(per_seed) / spread if spread else None,
            "worst_pretrained_minus_best_random": min(pre) - max(rnd)}


def demo_arguments(description: str, command: str, work: str) -> argparse.ArgumentParser:
    """The options both demo fine-tuning benchmarks take (this one and finetune_demo.py): `command` is the mixmae
    command they run, `work` the default folder of their runs."""
    parser = argparse.ArgumentParser(description=description)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", type=Path, help="the pretrained demo encoder (a run folder or an export)")
    which.add_argument("--pretrain-epochs", type=int, help="pretrain the demo profile for this many epochs first")
    parser.add_argument("--demo", type=Path, required=True, help="the demo folder (`mixmae shards demo --out`)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides",
                        help=f"profile overrides for both inits (key=value), as `mixmae {command} --set`")
    return parser


def main() -> None:
    parser = demo_arguments(__doc__.split("\n\n")[0], "segment", "runs/seg_demo_benchmark")
    parser.add_argument("--random-set", nargs="*", default=[], dest="random_overrides",
                        help="further overrides for the random init only (its own lr, say)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the results file (default: results/seg_demo_cpu_<dtype>.json)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    encoder = args.encoder or pretrain_encoder(args.work, args.demo, args.pretrain_epochs, env)
    runs = []
    for seed in args.seeds:
        record = {"seed": seed}
        for name, init, extra in (("pretrained", str(encoder), []), ("random", "random", args.random_overrides)):
            run = args.work / f"{name}-seed{seed}"
            record[name] = run_record(run, segment(run, init, args.demo, seed, env, [*args.overrides, *extra]))
        runs.append(record)
        pre, rnd = record["pretrained"]["miou"], record["random"]["miou"]
        print(f"seed {seed}: pretrained mIoU {pre:.1f}%, random {rnd:.1f}% (margin {pre - rnd:+.1f} points)")
    summary = margins(runs)
    print(f"margin over seeds {args.seeds}: {summary['min_margin']:+.1f} to {max(summary['margin_per_seed']):+.1f} "
          f"points; worst pretrained - best random {summary['worst_pretrained_minus_best_random']:+.1f}")
    dtype = runs[0]["pretrained"]["dtype"]
    out = args.out or RESULTS / f"seg_demo_cpu_{dtype}.json"
    out.write_text(json.dumps({"command": "python benchmarks/seg_demo.py " + " ".join(sys.argv[1:]),
                               "profile": "seg_demo", "overrides": args.overrides,
                               "random_overrides": args.random_overrides, "encoder": encoder_record(encoder),
                               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "runs": runs, "summary": summary},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
