"""benchmarks/seg_demo.py's bookkeeping: the margins it reports and the encoder provenance it records (the runs
themselves are launches of `mixmae segment`, tested in tests/integration/test_segment.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "seg_demo.py"


@pytest.fixture(scope="module")
def seg_demo():
    spec = importlib.util.spec_from_file_location("seg_demo_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_margins_are_per_seed_and_the_worst_case_is_against_the_best_random(seg_demo):
    runs = [{"pretrained": {"miou": 27.0}, "random": {"miou": 20.0}},
            {"pretrained": {"miou": 24.0}, "random": {"miou": 22.0}},
            {"pretrained": {"miou": 30.0}, "random": {"miou": 18.0}}]
    summary = seg_demo.margins(runs)
    assert summary["margin_per_seed"] == [7.0, 2.0, 12.0]
    assert summary["min_margin"] == 2.0 and summary["margin_mean"] == pytest.approx(7.0)
    assert summary["random_spread"] == pytest.approx(2.0)
    assert summary["min_margin_in_random_spreads"] == pytest.approx(1.0)
    assert summary["worst_pretrained_minus_best_random"] == pytest.approx(2.0)


def test_the_encoders_pretraining_is_read_from_its_run_folder(seg_demo, tmp_path):
    run = tmp_path / "encoder-20ep"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 3240, "images_seen": 51840, "dtype": "fp32",
                                                  "heldout_loss_start": 1.08, "heldout_loss_end": 0.55,
                                                  "wall_s": 463.0, "other": 1}))
    export = run / "encoder.safetensors"
    export.write_bytes(b"")
    for named in (export, run):
        record = seg_demo.encoder_record(named)
        assert record["path"] == str(named) and record["steps"] == 3240 and record["heldout_loss_end"] == 0.55
        assert "other" not in record
    assert seg_demo.encoder_record(tmp_path / "elsewhere.safetensors") == {
        "path": str(tmp_path / "elsewhere.safetensors")}


def test_the_fine_tuning_benchmark_reports_the_last_evaluation_and_signed_top1_margins(tmp_path):
    """benchmarks/finetune_demo.py: the last evaluation's top-1 is the result (the best one is chosen on the same
    validation images, so it is kept beside it, not used), and margins keep their sign: on the demo they are
    negative."""
    spec = importlib.util.spec_from_file_location("finetune_demo_benchmark", SCRIPT.with_name("finetune_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = tmp_path / "pretrained-seed0"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "dtype": "bf16", "steps": 810, "images_per_s": 150.0,
        "last": {"top1": 59.1, "top5": 99.0, "samples": 1500}, "best": {"top1": 60.2}}))
    record = module.run_record(run, 190.4)
    assert (record["top1"], record["best_top1"], record["val_images"], record["launch_s"]) == (59.1, 60.2, 1500, 190)
    summary = module.margins([{"pretrained": {"top1": 59.0}, "random": {"top1": 70.0}},
                              {"pretrained": {"top1": 61.0}, "random": {"top1": 66.0}}], "top1")
    assert summary["pretrained_top1"] == [59.0, 61.0] and summary["margin_per_seed"] == [-11.0, -5.0]
    assert summary["worst_pretrained_minus_best_random"] == -11.0
