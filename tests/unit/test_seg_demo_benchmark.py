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
