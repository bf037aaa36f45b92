"""Running a sweep: locally one run after another (finished runs are skipped), or as cluster commands.

Each run pretrains with its own budget as the whole schedule (warm-up 10%, cosine to the end), on a
subset of the training shards for its data fraction, and appends one line to `results.jsonl`: N, D,
C, the final training loss, the held-out reconstruction loss with fixed masks and seed (comparable
across runs), optionally a linear-probe top-1, and the wall time.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.manifest import load_split
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec, expand


def subset_shards(shards: Path, fraction: float, out: Path) -> Path:
    """A folder whose manifest lists the first ceil(fraction x n) training shards (linked, not copied)
    and every validation shard: data fractions are nested, so larger ones see a superset."""
    folder = out / f"fraction-{fraction:g}"
    if (folder / "dataset.json").exists():
        return folder
    manifest = json.loads((shards / "dataset.json").read_text())
    train = manifest["splits"]["train"]
    keep = train["shards"][: max(1, math.ceil(fraction * len(train["shards"])))]
    folder.mkdir(parents=True, exist_ok=True)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for name in (shard["name"], shard["index"]):
                link = folder / name
                if not link.exists():
                    link.symlink_to((shards / name).resolve())
    manifest["splits"]["train"] = {**train, "shards": keep, "samples": sum(s["samples"] for s in keep)}
    for name in ("classes.json",):
        if (shards / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to((shards / name).resolve())
    write_text(folder / "dataset.json", json.dumps(manifest, indent=1))
    return folder


def run_overrides(run: PlannedRun, shards: Path, steps_per_epoch: int) -> list[str]:
    """The run's budget is its whole schedule: warm-up 10%, cosine to the last step."""
    epochs = run.steps / steps_per_epoch
    return [*run.overrides, f"data.shards={shards}", f"schedule.epochs={epochs!r}",
            f"schedule.warmup_epochs={0.1 * epochs!r}", "checkpoint.every_steps=1000000",
            "logging.visualize_every_steps=0", "logging.tensorboard=false", f"run.name={run.run_id}"]


def _finished(results: Path) -> set[str]:
    if not results.exists():
        return set()
    return {json.loads(line)["run_id"] for line in results.read_text().splitlines() if line.strip()}


def _append(results: Path, row: dict) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_sweep(spec: SweepSpec, out: Path, emit_commands: Path | None = None, log=print) -> list[dict]:
    shards = Path(spec.shards)
    train_samples = load_split(shards, "train").samples
    runs = expand(spec, train_samples)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = _finished(results)
    rows = []
    lines = []
    for index, run in enumerate(runs, start=1):
        subset = subset_shards(shards, run.data_fraction, out / "data")
        samples = load_split(subset, "train").samples
        steps_per_epoch = max(1, samples // _global_batch(spec, run))
        sets = [arg for item in run_overrides(run, subset, steps_per_epoch) for arg in ("--set", item)]
        if emit_commands is not None:
            lines.append("mixmae launch " + shlex.join([spec.profile, *sets]))
            continue
        args = ["pretrain", "--profile", spec.profile, "--run-dir", str(out / "runs" / run.run_id),
                "--max-steps", str(run.steps), *sets]
        if run.run_id in done:
            log(f"[{index}/{len(runs)}] {run.run_id}: done earlier, skipped")
            continue
        log(f"[{index}/{len(runs)}] {run.run_id}: N={run.params / 1e6:.2f}M D={run.images_seen} C={run.flops:.3g}")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "mixmae_scale.cli", *args], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        if result.returncode:
            raise RuntimeError(f"run {run.run_id} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        run_dir = out / "runs" / run.run_id
        summary = json.loads((run_dir / "summary.json").read_text())
        last_row = (run_dir / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
        row = {**asdict(run), "overrides": list(run.overrides), "train_loss": float(last_row[3]),
               "heldout_loss": summary["heldout_loss_end"], "wall_s": time.perf_counter() - start}
        if spec.probe:
            row["probe_top1"] = _probe(run_dir, subset)
        _append(results, row)
        rows.append(row)
        log(f"    held-out loss {row['heldout_loss']:.4f}, train loss {row['train_loss']:.4f}, {row['wall_s']:.0f} s")
    if emit_commands is not None:
        emit_commands.write_text("".join(line + "\n" for line in lines))
        log(f"wrote {len(lines)} launch command(s) to {emit_commands}")
    return rows


def _global_batch(spec: SweepSpec, run: PlannedRun) -> int:
    from mixmae_scale.config import load_resolved

    return load_resolved(spec.profile, overrides=run.overrides, world_size=1, train_samples=10**9).derived.global_batch


def _probe(run_dir: Path, shards: Path) -> float:
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import linear_probe

    state, arch = load_encoder(run_dir)
    return linear_probe(state, arch, str(shards), load_split(shards, "train").num_classes).top1
