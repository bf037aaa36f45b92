"""Segmentation fine-tuning for real, on one CPU rank (nothing here needs ranks to meet: the shared loop's
multi-rank behaviour is tested with pretraining and classification): the deepspeed launcher, the demo shards'
masks through DALI, the mIoU evaluation and best checkpoint, the export and `mixmae eval` on it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from free_port import free_port

pytestmark = pytest.mark.slow


def test_a_short_segmentation_run_evaluates_keeps_its_best_and_its_export_scores_the_same(demo_shards, tmp_path,
                                                                                        capsys):
    run_dir = tmp_path / "run"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
                "--module", "mixmae_scale.cli"]
    result = subprocess.run(
        launcher + ["segment", "--profile", "seg_demo", "--init", "random", "--run-dir", str(run_dir), "--set",
                    f"data.shards={demo_shards}", "batch.micro=8", "batch.global_batch=8", "segment.crop_size=64",
                    "segment.head_channels=32", "segment.eval_every_steps=4", "data.shuffle_buffer=64",
                    "precision.dtype=fp32", "logging.every_steps=2", "--max-steps", "6"],
        env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4, 6]
    assert all(e["samples"] == 80 and 0 <= e["miou"] <= 100 for e in evals)  # the 80 validation images, once each
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["miou"] == max(e["miou"] for e in evals)
    assert any((run_dir / "best").glob("*/COMPLETE"))
    assert f"mIoU {evals[-1]['miou']:.2f}%" in result.stdout
    assert json.loads((run_dir / "run.json").read_text())["job"] == "segment"  # it said pretrain
    # metrics.csv's lr is the schedule's (linear warm-up here), not the head's group at head_lr_scale (30x) times it
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["data"]["crop_scale"] == [0.25, 1.0]  # segmentation's recipe, written where the profile has null
    derived = written["derived"]
    assert derived["warmup_steps"] > 6
    with (run_dir / "metrics.csv").open() as handle:
        lrs = {int(row["step"]): float(row["lr"]) for row in csv.DictReader(handle)}
    assert sorted(lrs) == [2, 4, 6]
    for step, lr in lrs.items():
        # the lr the step ran at: DeepSpeed's WarmupCosineLR runs step k at iteration k - 2 (docs/recipe.md)
        assert lr == pytest.approx(derived["learning_rate"] * (step - 2) / derived["warmup_steps"], rel=1e-6), lrs

    from mixmae_scale.engine.export import export_run

    exported = export_run(run_dir)
    assert exported["kind"] == "segment" and exported["out"] == str(run_dir / "segmenter.safetensors")
    from mixmae_scale.cli import main

    capsys.readouterr()
    assert main(["eval", "--init", exported["out"], "--data", str(demo_shards), "--json"]) == 0  # in this process
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["samples"] == 80 and report["precision"] == evals[-1]["precision"] == "fp32"
    assert report["miou"] == pytest.approx(evals[-1]["miou"], abs=1e-6)  # the run's last weights, the same view
