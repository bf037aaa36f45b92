"""A sweep's real runs: pretraining runs started by the sweep's worker processes, read back into results.jsonl.
What the sweep does around its runs (the lr sweep's choice, skipping, reading folders, fit, report, emitted
commands) is tests/unit/test_scaling_sweep.py's, with stub runs."""

from __future__ import annotations

import pytest

from mixmae_scale.scaling.report import read_results
from mixmae_scale.scaling.run import run_sweep
from mixmae_scale.scaling.spec import expand, load_spec

pytestmark = pytest.mark.slow

TWO_RUNS = """
name: two
profile: tiny
shards: {shards}
steps: [3]
seeds: [0, 1]
sizes:
  - {{name: w8, model: {{embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 32, decoder_heads: 2}}}}
data_fractions: [1.0]
set: ["batch.micro=8", "batch.global_batch=8", "logging.every_steps=1", "logging.heldout_batches=1", "zero.stage=0",
      "data.shuffle_buffer=64"]
"""


def test_two_runs_in_one_process_end_exactly_as_two_separate_processes(demo_shards, tmp_path):
    """`--runs-per-process`: the second run (seed 1) starts after the first destroyed its process group in the same
    process; its losses and weights must be bit for bit those of a run in a process of its own. (Seed 0 runs first
    in its process either way, so only seed 1 runs apart.)"""
    import dataclasses

    import torch

    spec_path = tmp_path / "two.yaml"
    spec_path.write_text(TWO_RUNS.format(shards=demo_shards))
    spec = load_spec(spec_path)
    said: dict[str, list[str]] = {"together": [], "apart": []}
    for name, per_process, seeds in (("together", 2, [0, 1]), ("apart", 1, [1])):
        run_sweep(dataclasses.replace(spec, seeds=seeds), tmp_path / name, log=said[name].append,
                  per_process=per_process)
    assert said["together"][0].endswith("up to 2 runs per process") and said["apart"][0].endswith("one process per run")
    assert said["together"][-2].startswith("sweep: 2 ran, 0 reused (finished earlier), 0 failed, in ")
    rows = {name: {r["run_id"]: r for r in read_results(tmp_path / name / "results.jsonl")} for name in said}
    assert sorted(rows["together"]) == ["w8-d1-s3-seed0", "w8-d1-s3-seed1"] and list(rows["apart"]) == [
        "w8-d1-s3-seed1"]
    for run_id, row in rows["apart"].items():
        assert (row["train_loss"], row["heldout_loss"]) == (rows["together"][run_id]["train_loss"],
                                                             rows["together"][run_id]["heldout_loss"])
        weights = [torch.load(tmp_path / name / "runs" / run_id / "checkpoints" / "step00000003" /
                              "mp_rank_00_model_states.pt", weights_only=False)["module"] for name in said]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert rows["together"]["w8-d1-s3-seed0"]["heldout_loss"] != rows["together"]["w8-d1-s3-seed1"]["heldout_loss"]


def test_a_sweep_over_a_set_without_a_validation_split_records_the_steps_its_runs_took(demo_shards, tmp_path):
    """Without a val split the held-out loss takes the train split's last micro-batch, which shortens each run's
    epochs: planned 40 steps of 8 from 300 images (37 per epoch), the run's own schedule ends at 39 (36 per epoch).
    The run is a point of the study (not a stopped run), recorded with the steps, images and FLOPs it trained, not
    the planned 40."""
    import json
    import shutil

    shards = tmp_path / "train-only"
    shutil.copytree(demo_shards, shards)
    manifest = json.loads((shards / "dataset.json").read_text())
    del manifest["splits"]["val"]
    (shards / "dataset.json").write_text(json.dumps(manifest))
    spec_path = tmp_path / "one.yaml"
    spec_path.write_text(TWO_RUNS.format(shards=shards).replace("steps: [3]", "steps: [40]")
                         .replace("seeds: [0, 1]", "seeds: [0]"))
    spec = load_spec(spec_path)
    (planned,) = expand(spec, spec.train_samples_for_plan())
    (row,) = run_sweep(spec, tmp_path / "sweep", log=lambda line: None)
    assert (planned.steps, planned.images_seen) == (40, 40 * 8)
    assert (row["steps"], row["planned_steps"], row["images_seen"]) == (39, 40, 39 * 8)
    assert row["heldout_loss"] > 0 and row["flops"] == pytest.approx(planned.flops * 39 / 40)
