"""A 2x2 sweep end to end on the demo shards: plan, run (real pretraining runs), resume, fit, report."""

from __future__ import annotations

import json

import pytest

from mixmae_scale.config import ConfigError
from mixmae_scale.scaling.fit import FitError
from mixmae_scale.scaling.report import fit_results, read_results, write_report
from mixmae_scale.scaling.run import run_sweep
from mixmae_scale.scaling.spec import expand, load_spec

pytestmark = pytest.mark.slow

SPEC = """
name: two-by-two
profile: tiny
shards: {shards}
sizes:
  - {{name: w8, model: {{embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 32, decoder_heads: 2}}}}
  - {{name: w16, model: {{embed_dim: 16, num_heads: [1, 2, 4, 8], decoder_dim: 64, decoder_heads: 2}}}}
data_fractions: [1.0]
steps: [6, 12]
set: ["batch.micro=8", "logging.every_steps=3", "logging.heldout_batches=2", "zero.stage=0",
      "data.shuffle_buffer=64"]
"""


def test_two_by_two_sweep_runs_resumes_fits_and_reports(demo_shards, tmp_path):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(SPEC.format(shards=demo_shards))
    spec = load_spec(spec_path)
    planned = expand(spec, 300)
    assert [r.run_id for r in planned] == ["w8-d1-s6-seed0", "w8-d1-s12-seed0", "w16-d1-s6-seed0", "w16-d1-s12-seed0"]
    assert planned[1].flops == pytest.approx(2 * planned[0].flops) and planned[2].params > planned[0].params
    out = tmp_path / "sweep"
    messages: list[str] = []
    rows = run_sweep(spec, out, log=messages.append)
    assert len(rows) == 4 and all(r["heldout_loss"] > 0 and r["wall_s"] > 0 for r in rows)
    assert run_sweep(spec, out, log=messages.append) == [] and sum("skipped" in m for m in messages) == 4
    results = read_results(out / "results.jsonl")
    fit = fit_results(results, bootstrap=20)
    assert fit["L_of_C"]["values"]["alpha"] > 0
    assert "not fitted" in fit["L_of_N_D"]  # 4 runs cannot pin down 5 parameters: said, not faked
    report = write_report(results, fit, out / "report")
    assert "L(C) = E + A C^-alpha" in report.read_text()
    assert all((out / "report" / name).stat().st_size > 1000 for name in
               ("loss_vs_compute.png", "loss_vs_params.png", "iso_flop.png", "predicted_vs_observed.png"))
    run_sweep(spec, out, emit_commands=out / "commands.txt")
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 4 and all(c.startswith("mixmae launch tiny") for c in commands)


def test_malformed_specs_and_results_are_refused_with_the_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprofile: tiny\nshards: s\nsizes: [tiny]\ndata_fractions: [1.5]\nsteps: [1]\n")
    with pytest.raises(ConfigError, match=r"data_fractions must lie in \(0, 1\]"):
        load_spec(bad)
    bad.write_text("name: x\nprofile: tiny\nshards: s\nsizes: [tiny]\ndata_fractions: [1]\nsteps: [1]\nepochs: [1]\n")
    with pytest.raises(ConfigError, match="exactly one of 'steps' or 'epochs'"):
        load_spec(bad)
    bad.write_text("name: x\nprofile: tiny\nsizes: [tiny]\ndata_fractions: [1]\nsteps: [1]\nstepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_spec(bad)
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"run_id": "a", "params": 1}) + "\n")
    with pytest.raises(FitError, match="lacks images_seen, flops, heldout_loss"):
        read_results(results)
    results.write_text("{not json\n")
    with pytest.raises(FitError, match="results.jsonl:1: not JSON"):
        read_results(results)
