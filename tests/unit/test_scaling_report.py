"""The scaling report claims no more than its fits support: derived results only from identified laws, no inf
or NaN, unbounded intervals said so, and the committed example is exactly what the command regenerates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_isoflop import _sweep

from mixmae_scale.cli import main
from mixmae_scale.scaling.fit import nd_law
from mixmae_scale.scaling.intervals import bootstrap_interval, format_interval, verdict
from mixmae_scale.scaling.report import fit_results, report_markdown

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "scaling-example"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def _same_but_for_the_last_digit(new: str, committed: str) -> None:
    """Text equal, numbers within 2e-3: another CPU's OpenBLAS kernels moved this report's fits by 5e-8
    (measured), which can round a printed 4th digit the other way."""
    assert NUMBER.sub("#", new) == NUMBER.sub("#", committed)
    for a, b in zip(NUMBER.findall(new), NUMBER.findall(committed), strict=True):
        assert float(a) == pytest.approx(float(b), rel=2e-3), (a, b)


def _same_json(new, committed) -> None:
    if isinstance(committed, dict):
        assert list(new) == list(committed)
        for key in committed:
            _same_json(new[key], committed[key])
    elif isinstance(committed, list):
        assert len(new) == len(committed)
        for a, b in zip(new, committed, strict=True):
            _same_json(a, b)
    elif isinstance(committed, float):
        assert new == pytest.approx(committed, rel=1e-6)
    else:
        assert new == committed


def test_the_committed_iso_flop_pilot_report_is_what_the_command_regenerates(tmp_path):
    example = EXAMPLES / "iso-flop-pilot"
    shutil.copy(example / "results.jsonl", tmp_path)
    assert main(["scaling", "report", "--out", str(tmp_path), "--report-dir", str(tmp_path)]) == 0
    _same_but_for_the_last_digit((tmp_path / "report.md").read_text(), (example / "report.md").read_text())
    _same_json(json.loads((tmp_path / "fit.json").read_text()), json.loads((example / "fit.json").read_text()))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in example.glob("*.png"))


def test_a_single_seed_sweep_reports_values_but_no_identified_law_and_nothing_derived():
    rows, _, _ = _sweep(seeds=1)
    fit = fit_results(rows, bootstrap=20)
    text = json.dumps(fit, allow_nan=False)  # raises on inf or NaN
    iso = fit["iso_flop"]
    assert not iso["N_opt"]["identified"] and iso["N_opt"]["exponent"] is not None
    assert iso["L_opt_extrapolation"] == "not run: L*(C) is not identified" and "Infinity" not in text
    report = report_markdown(rows, fit, [])
    assert report.count("(one seed: 5 of 5 interior budgets have a size run once)") == 5  # N*, D*, L*'s 3
    assert "Extrapolation check of L*(C) (fitted without the largest interior budget, its L* predicted): not run: " \
           "L*(C) is not identified" in report


def test_an_identified_law_gives_its_optimal_split_and_flags_what_lies_outside_the_runs():
    rng = np.random.default_rng(1)
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 5), np.logspace(7, 10, 5)))
    loss = nd_law(n, d, 0.5, 40.0, 0.34, 400.0, 0.28) * np.exp(rng.normal(0, 0.003, n.size))
    rows = [{"run_id": f"r{i}", "params": int(a), "images_seen": int(b), "flops": 6.0 * a * b, "heldout_loss": v}
            for i, (a, b, v) in enumerate(zip(n, d, loss, strict=True))]
    fit = fit_results(rows, bootstrap=30)
    assert fit["L_of_N_D"]["identified"] and len(fit["compute_optimal"]) == 5
    within = [1e6 <= p["params"] <= 1e9 and 1e7 <= p["images"] <= 1e10 for p in fit["compute_optimal"]]
    assert [p["within_trained"] for p in fit["compute_optimal"]] == within and not all(within)
    report = report_markdown(rows, fit, [])
    assert "| N* and D* within the N and D trained |" in report and "**no**: an extrapolation of the law" in report
    # The same runs with a law the bootstrap cannot pin down: the split is withheld, and said to be.
    fit["L_of_N_D"]["identified"] = False
    fit["compute_optimal"] = "not identified: 1 of 5 parameters of L(N, D) are not identified"
    report = report_markdown(rows, fit, [])
    assert "Compute-optimal allocation from L(N, D): not identified: 1 of 5" in report and "| N* |" not in report


def test_intervals_say_what_they_support():
    assert format_interval((0.3518, 5.935e80)) == "unbounded (> 1e3x)"
    assert verdict((0.3518, 5.935e80), "") == "not identified (spans > 1e3x)"
    assert verdict((0.2, 0.8), "") == "not identified (wider than 3x)" and verdict((0.3, 0.8), "") == "identified"
    assert verdict((-0.18, 0.08), "") == "not identified (reaches zero)"
    assert verdict(None, "one seed") == "not identified (one seed)"
    # Rounds without a value are values with no bound: past 5% of the rounds there is no 5-95% interval.
    assert bootstrap_interval(list(np.linspace(1, 2, 95)), 100) is not None
    assert bootstrap_interval(list(np.linspace(1, 2, 94)), 100) is None
