"""The quickstart's evidence, re-measured: the demo pretraining with several training seeds, each probed
(linear and k-NN on the demo classes) against the same five randomly initialised encoders.

Runs, per seed, the quickstart's own commands on a CPU (the demo profile, 810 steps in one process through the
deepspeed launcher, precision auto, OMP_NUM_THREADS=2) and `mixmae probe --json` (with `--baseline
--baseline-seeds 5` once: the random encoders do not depend on the training seed), then prints each seed's
margins and writes results/demo_probe_cpu_<dtype>.json. A seed whose run folder in --work already finished is
probed again, not retrained (an interrupted benchmark resumes, and the seeds can be run a few at a time).

What the demo is judged by, per seed and probe: the margin over the strongest random encoder (`min_margin`) and
the margin over their mean in units of their standard deviation (`margin_in_spread`).

    python benchmarks/demo_probe.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
BASELINE_SEEDS = 5
READOUTS = (("linear", "top1"), ("knn", "knn_top1"))


def pretrain(run: Path, demo: Path, seed: int, env: dict) -> float | None:
    """Seconds the launch took, or None when the run had finished before (not retrained)."""
    if (run / "summary.json").exists():
        return None
    start = time.perf_counter()
    subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "1", "--module", "mixmae_scale.cli", "pretrain",
                    "--profile", "demo", "--run-dir", str(run), "--set", f"data.shards={demo / 'shards'}",
                    f"run.seed={seed}"], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def probe(run: Path, demo: Path, env: dict, baseline: bool) -> dict:
    extra = ["--baseline", "--baseline-seeds", str(BASELINE_SEEDS)] if baseline else []
    out = subprocess.run([str(BIN / "mixmae"), "probe", "--init", str(run), "--data", str(demo / "shards"), "--json",
                          *extra], check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def seed_record(seed: int, run: Path, seconds: float | None, pretrained: dict, baseline: dict) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    record = {"seed": seed, "dtype": summary["dtype"], "steps": summary["steps"],
              "heldout_loss": [summary["heldout_loss_start"], summary["heldout_loss_end"]],
              "pretrain_launch_s": None if seconds is None else round(seconds), "pretrained": pretrained}
    for readout, key in READOUTS:
        spread = baseline[readout]
        margin = pretrained[key] - spread["mean"]
        record[readout] = {"pretrained": pretrained[key], "margin": margin,
                           "min_margin": pretrained[key] - spread["max"], "margin_in_spread": margin / spread["std"]}
    return record


def line(record: dict, baseline: dict) -> str:
    parts = [f"{name} {r['pretrained']:.1f}% vs {baseline[readout]['mean']:.1f} +- {baseline[readout]['std']:.1f} "
             f"({r['margin']:+.1f} points, {r['margin_in_spread']:.1f}x spread, {r['min_margin']:+.1f} over the best "
             "random)" for readout, name in (("linear", "linear"), ("knn", "k-NN")) for r in [record[readout]]]
    return f"seed {record['seed']}: " + "; ".join(parts)


def over_seeds(runs: list[dict]) -> dict:
    summary = {}
    for readout, _ in READOUTS:
        margins = [r[readout]["margin"] for r in runs]
        summary[readout] = {"margin_mean": statistics.fmean(margins),
                            "margin_std": statistics.stdev(margins) if len(margins) > 1 else None,
                            "worst_min_margin": min(r[readout]["min_margin"] for r in runs),
                            "worst_margin_in_spread": min(r[readout]["margin_in_spread"] for r in runs)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-demo-probe")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"}
    demo = args.work / "demo"
    if not (demo / "shards" / "dataset.json").exists():
        subprocess.run([str(BIN / "mixmae"), "shards", "demo", "--out", str(demo)], check=True,
                       env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True)
    baseline_file = args.work / "random_init.json"
    records_file = args.work / "seeds.json"
    records = json.loads(records_file.read_text()) if records_file.exists() else {}
    for seed in args.seeds:
        run = args.work / f"seed{seed}"
        seconds = pretrain(run, demo, seed, env)
        report = probe(run, demo, env, baseline=not baseline_file.exists())
        if not baseline_file.exists():
            baseline_file.write_text(json.dumps({readout: report[readout]["random_init"] for readout, _ in READOUTS}
                                                | {"runs": report["random_init"]}))
        baseline = json.loads(baseline_file.read_text())
        previous = records.get(str(seed), {}).get("pretrain_launch_s")
        records[str(seed)] = seed_record(seed, run, seconds if seconds is not None else previous, report["pretrained"],
                                         baseline)
        records_file.write_text(json.dumps(records))
        print(line(records[str(seed)], baseline), flush=True)
    runs = [records[key] for key in sorted(records, key=int)]
    write_results(runs, json.loads(baseline_file.read_text()))


def write_results(runs: list[dict], baseline: dict) -> None:
    from mixmae_scale.atomic_file import write_text

    summary = over_seeds(runs)
    for readout, _ in READOUTS:
        s = summary[readout]
        print(f"{readout} over {len(runs)} seeds: margin {s['margin_mean']:+.1f} +- {s['margin_std'] or 0:.1f} points; "
              f"worst seed {s['worst_min_margin']:+.1f} over the best random encoder, "
              f"{s['worst_margin_in_spread']:.1f}x their spread")
    result = {"what": "the quickstart's demo evidence (benchmarks/demo_probe.py): MixMAE pretraining of the demo "
              f"profile (tiny Swin, {runs[0]['steps']} steps) in one CPU process through the deepspeed launcher, then "
              "`mixmae probe "
              f"--json` against {BASELINE_SEEDS} random inits (probed once) on 2600 train / 1500 val demo images; "
              "linear read-out on every stage's tokens pooled to a 2x2 grid but the last stage's to 3x3 (its whole "
              "map at 96 px), "
              "k-NN on the first two stages' pooled tokens",
              "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
              "random_init": baseline, "over_seeds": summary, "runs": runs}
    out = RESULTS / f"demo_probe_cpu_{runs[0]['dtype']}.json"
    write_text(out, json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
