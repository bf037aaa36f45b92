"""Fine-tuning learns. A module of its own: --dist loadscope keeps a module on one test process, and these 216
steps on 2 ranks, one of the suite's longest tests, need none of test_finetune.py's runs."""

from __future__ import annotations

import json

import pytest
from test_finetune import metric_losses, run

pytestmark = pytest.mark.slow


def test_finetuning_from_a_random_init_learns_the_demo_classes(demo_shards, tmp_path):
    """The fine-tuning loop (layer-decay groups, schedule, DeepSpeed step, head) learns: 216 steps on 2 ranks from
    a random init, the augmentations that slow a short run off, at an lr a random init tolerates. Measured here
    (2 ranks, lr 0.004): training loss 2.29 -> 1.85 and validation top-5 87.5% with run.seed 0, 2.30 -> 1.99 and
    81.2% with seed 1 (chance 50%; top-1 15-16%, too close to chance's 10% over 80 images to assert); one rank:
    2.30 -> 1.86, 83.8%. At 0.008 (this test's lr before) a random init sat at the edge: one rank learned with
    seed 0 (top-5 80%) but not seed 1 (61%), two ranks with neither (50%, 55%)."""
    off = ("finetune.mixup=0", "finetune.cutmix=0", "finetune.rand_augment_ops=0", "finetune.random_erasing=0",
           "finetune.label_smoothing=0", "finetune.layer_decay=1", "model.drop_path=0")
    run("finetune", "--profile", "finetune_tiny", "--run-dir", str(tmp_path / "run"), "--set",
        f"data.shards={demo_shards}", "finetune.init=random", "batch.micro=8", "batch.global_batch=16",
        "logging.every_steps=6", "finetune.eval_every_epochs=12", "optim.base_learning_rate=0.004",
        "precision.dtype=fp32", "schedule.epochs=12", "schedule.warmup_epochs=1", *off)
    curve = list(metric_losses(tmp_path / "run").values())
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    final = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    print(f"\ntraining loss {first:.3f} -> {last:.3f}; validation top-1 {final['top1']:.1f}%, "
          f"top-5 {final['top5']:.1f}% at step {final['step']}")
    assert final["step"] == 216 and final["samples"] == 80
    assert last < first - 0.15 and final["top5"] >= 65
