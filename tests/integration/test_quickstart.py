"""The quickstart's path on the demo set, pretraining to probing. A module of its own: --dist loadscope keeps a
module on one test process, and this test, one of the suite's longest, needs none of test_finetune.py's runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from free_port import free_port
from test_finetune import run

pytestmark = pytest.mark.slow


def test_the_quickstart_path_pretrains_the_whole_schedule_the_dry_run_shows_and_probes_against_random_encoders(
        demo_shards, tmp_path, capsys):
    """The quickstart's steps on the small demo set: the demo profile in one CPU process with two threads through
    the deepspeed launcher, its whole schedule (5 epochs), the step count `mixmae launch --dry-run` printed for
    it, and `mixmae probe --baseline` against three random encoders.

    Whether pretraining beats the random encoders is measured over training seeds on the full demo by
    benchmarks/demo_probe.py (benchmarks/results/demo_probe_cpu_fp32.json), not here: 90 steps on 300 images are
    far too few to learn the demo's shapes."""
    from mixmae_scale.cli import main

    run("pretrain", "--profile", "demo", "--run-dir", str(tmp_path / "run"), "--set", f"data.shards={demo_shards}",
        ranks=1, threads=2, port=free_port())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 5 * (300 // 16) and summary["heldout_loss_end"] < summary["heldout_loss_start"]
    assert main(["launch", "demo", "--dry-run", "--set", f"data.shards={demo_shards}"]) == 0
    assert f"total steps      {summary['steps']} (5 epochs" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "mixmae_scale.cli", "probe", "--init", str(tmp_path / "run"),
                          "--data", str(demo_shards), "--baseline", "--json"], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert len(report["random_init"]) == 3 and len({r["top1"] for r in report["random_init"]} |
                                                   {r["knn_top1"] for r in report["random_init"]}) > 1
    for readout, key in (("linear", "top1"), ("knn", "knn_top1")):  # the margin's arithmetic: tests/unit/test_probe.py
        assert report[readout]["pretrained"] == report["pretrained"][key]
    assert report["pretrained"]["val_samples"] == 80 and report["pretrained"]["train_samples"] == 300
