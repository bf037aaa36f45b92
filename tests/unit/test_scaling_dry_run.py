"""`mixmae scaling run --dry-run`: the runs it would launch, skip, read or resume, and a time estimate that names its
source, with nothing trained or written."""

from __future__ import annotations

import dataclasses
import json
import re

from mixmae_scale.cli import main as cli_main
from mixmae_scale.scaling.dry_run import dry_run, finish_time
from mixmae_scale.scaling.spec import expand, load_spec
from mixmae_scale.scaling.workers import estimated_seconds

SPEC = """
name: dry
profile: tiny
shards: {shards}
budgets: [2.0e10, 4.0e10]
seeds: [0, 1]
sizes:
  - {{name: w8, model: {{embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 32, decoder_heads: 2}}}}
  - {{name: w12, model: {{embed_dim: 12, num_heads: [1, 2, 4, 4], decoder_dim: 48, decoder_heads: 2}}}}
  - {{name: w16, model: {{embed_dim: 16, num_heads: [1, 2, 4, 8], decoder_dim: 64, decoder_heads: 2}}}}
data_fractions: [1.0]
set: ["batch.micro=8", "batch.global_batch=8", "zero.stage=0"]
"""


def _spec(tmp_path, demo_shards):
    path = tmp_path / "sweep.yaml"
    path.write_text(SPEC.format(shards=demo_shards))
    spec = load_spec(path)
    return spec, expand(spec, spec.train_samples_for_plan(option=None))


def _seconds(line: str, label: str) -> float:
    return float(re.search(label + r" ([\d,.]+) s ", line).group(1).replace(",", ""))


def test_a_dry_run_lists_what_each_run_would_do_and_estimates_from_runs_measured_in_the_folder(
        demo_shards, tmp_path, capsys):
    spec, runs = _spec(tmp_path, demo_shards)
    out = tmp_path / "sweep"
    by_id = {run.run_id: run for run in runs}
    # Two seeds of one size and steps: the first run of a worker carries its process's start-up; the faster is used.
    slow, recorded = by_id["w8-C2e+10-seed0"], by_id["w8-C2e+10-seed1"]
    cut = '{"run_id": "w16-C4e+10-se'  # a last line a kill cut short
    out.mkdir()
    wall_s = 12.5
    (out / "results.jsonl").write_text("".join(
        json.dumps({**dataclasses.asdict(run), "sweep": spec.name, "heldout_loss": 0.5, "wall_s": wall}) + "\n"
        for run, wall in ((slow, 4 * wall_s), (recorded, wall_s))) + cut)
    finished, stopped = by_id["w12-C2e+10-seed0"], by_id["w8-C4e+10-seed1"]
    (out / "runs" / finished.run_id).mkdir(parents=True)
    (out / "runs" / finished.run_id / "summary.json").write_text(
        json.dumps({"steps": finished.steps, "heldout_loss_end": 0.5}))
    (out / "runs" / stopped.run_id).mkdir(parents=True)
    (out / "runs" / stopped.run_id / "summary.json").write_text(
        json.dumps({"steps": 3, "planned_steps": stopped.steps, "stopped_by_signal": "SIGTERM"}))
    before = {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    lines: list[str] = []
    steps = {step.run.run_id: step for step in dry_run(spec, out, parallel=2, log=lines.append)}
    assert {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")} == before
    assert lines[0] == (f"{out / 'results.jsonl'}: its last line is cut short ({len(cut)} bytes without a "
                        "newline): `scaling run` removes it, and that run is read again from its folder, or run again")
    assert steps[recorded.run_id].state == "recorded: skipped" and steps[recorded.run_id].steps_left == 0
    assert steps[finished.run_id].state.startswith("finished in its folder") and steps[finished.run_id].steps_left == 0
    assert steps[stopped.run_id].state.startswith("stopped at step 3") and steps[stopped.run_id].steps_left == \
        stopped.steps - 3
    # Estimated from the one measured run of size w8: its wall time per step times each w8 run's steps left.
    per_step = wall_s / recorded.steps
    w8_left = [s for s in steps.values() if s.run.size == "w8" and s.steps_left]
    assert {s.run.run_id for s in w8_left} == {"w8-C4e+10-seed0", stopped.run_id}
    assert all(s.seconds == per_step * s.steps_left and s.measured_by == recorded.run_id for s in w8_left)
    assert all(s.seconds is None for s in steps.values() if s.run.size != "w8")
    summary = next(line for line in lines if line.startswith("12 runs: "))
    assert summary.startswith("12 runs: 3 done (2 recorded, 1 finished in their folders), 0 refused, 9 left")
    measured = next(line for line in lines if line.startswith("estimate from runs measured here: "))
    assert _seconds(measured, "here:") == round(sum(s.seconds for s in w8_left))
    assert "2 of the 9 runs left" in measured and "(w12, w16)" in measured and "lower bound" in measured
    assert "wall_s / steps in results.jsonl" in measured and "the last run ends" not in measured  # partial: no end
    h100 = next(line for line in lines if line.startswith("estimate on an H100: "))
    left = [s for s in steps.values() if s.steps_left]
    assert _seconds(h100, "H100:") == round(sum(estimated_seconds(s.run) * s.steps_left / s.run.steps for s in left))
    assert "loop_overhead.json" in h100 and "not measured on these models" in h100


def test_a_dry_run_of_an_untouched_folder_prints_no_measured_estimate_and_writes_nothing(demo_shards, tmp_path,
                                                                                          capsys):
    spec, runs = _spec(tmp_path, demo_shards)
    out = tmp_path / "none-yet"
    code = cli_main(["scaling", "run", str(spec.file), "--out", str(out), "--dry-run", "--parallel", "3"])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert all(f"{run.run_id} " in printed for run in runs) and printed.count("  to run") == len(runs)
    assert "estimate from runs measured here: none (12 runs left, and no run of their sizes" in printed
    h100 = next(line for line in printed.splitlines() if line.startswith("estimate on an H100: "))
    costs = [((run.budget, -estimated_seconds(run)), estimated_seconds(run)) for run in runs]
    assert f"after about {finish_time(costs, 3):,.0f} s" in h100 and "with --parallel 3" in h100
    code = cli_main(["scaling", "run", str(spec.file), "--out", str(out), "--dry-run", "--emit-commands", "x.sh"])
    assert code == 2 and "--dry-run and --emit-commands" in capsys.readouterr().err and not out.exists()


def test_the_finish_time_is_that_of_workers_taking_runs_in_the_given_order():
    assert finish_time([((0,), 3.0), ((1,), 3.0), ((2,), 2.0)], 2) == 5.0
    assert finish_time([((2,), 2.0), ((0,), 3.0), ((1,), 3.0)], 1) == 8.0
    assert finish_time([((0,), 1.0), ((1,), 4.0), ((2,), 1.0), ((3,), 1.0)], 2) == 4.0


def test_a_dry_run_lists_a_recorded_row_of_another_plan_as_the_sweep_refuses_it(demo_shards, tmp_path):
    """A changed size's model keeps its run ids: the dry run listed those rows as skipped, where `scaling run`
    refuses the spec before any run starts."""
    spec, runs = _spec(tmp_path, demo_shards)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(
        json.dumps({**dataclasses.asdict(run), "overrides": list(run.overrides), "sweep": spec.name,
                    "profile": spec.profile, "sources": spec.sources, "heldout_loss": 0.5, "wall_s": 1.0}) + "\n"
        for run in runs if run.size in ("w8", "w12")))
    lines: list[str] = []
    assert all(s.state == "recorded: skipped" for s in dry_run(spec, out, log=lines.append) if s.steps_left == 0)
    assert not any("refuses" in line for line in lines)
    path = tmp_path / "sweep.yaml"
    path.write_text(path.read_text().replace("decoder_dim: 48", "decoder_dim: 40"))
    lines.clear()
    steps = dry_run(load_spec(path), out, log=lines.append)
    refused = [s.run.run_id for s in steps if s.state.startswith("REFUSED by `scaling run`")]
    assert refused == [r.run_id for r in runs if r.size == "w12"]
    assert all("overrides: model.decoder_dim=48 recorded, model.decoder_dim=40 planned" in s.state
               for s in steps if s.run.run_id in refused)
    assert any(line.startswith("`scaling run` refuses this spec here before any run starts: 4 recorded runs of "
                               "another plan under the same id (w12-C2e+10-seed0") for line in lines)


def test_a_resumed_runs_wall_time_is_taken_as_that_of_its_last_launchs_steps(demo_shards, tmp_path):
    """A resumed run's row records the wall time of its last launch alone: read as the time of all its steps, a run
    stopped at step 30 of 40 and resumed gave a time per step 4x too small, and, the fastest, set the estimate."""
    from mixmae_scale.scaling.dry_run import plan_steps

    spec, runs = _spec(tmp_path, demo_shards)
    out = tmp_path / "sweep"
    done, pending = (next(r for r in runs if r.run_id == name) for name in ("w8-C2e+10-seed0", "w8-C4e+10-seed0"))
    row = {**dataclasses.asdict(done), "wall_s": 10.0}
    (out / "runs" / done.run_id).mkdir(parents=True)
    (out / "runs" / done.run_id / "run.json").write_text(json.dumps({"launches": [
        {"start_step": 0, "end_step": 30}, {"start_step": 30, "end_step": done.steps}]}))
    step = next(s for s in plan_steps([pending], out, [row], [row]) if s.run.run_id == pending.run_id)
    assert step.seconds == 10.0 / (done.steps - 30) * pending.steps
    (out / "runs" / done.run_id / "run.json").unlink()  # copied without its folder: its steps are all it has
    step = next(s for s in plan_steps([pending], out, [row], [row]) if s.run.run_id == pending.run_id)
    assert step.seconds == 10.0 / done.steps * pending.steps


def test_a_finished_folder_the_sweep_would_not_record_is_listed_as_what_the_sweep_does_with_it(demo_shards, tmp_path):
    """A finished run whose held-out loss diverged is no point: `scaling run` records no row for it, counts it
    diverged and does not run it again; one that measured no held-out loss it counts failed. The dry run listed both
    as "finished in its folder: read". Each folder is also given to the sweep's own reader (`folder_row`), so the
    listing is checked against what the sweep does, not against a copy of its rule."""
    import pytest

    from mixmae_scale.scaling.recorded import Diverged, folder_row

    spec, runs = _spec(tmp_path, demo_shards)
    out = tmp_path / "sweep"
    by_id = {run.run_id: run for run in runs}
    ends = {"w8-C2e+10-seed0": float("nan"), "w8-C2e+10-seed1": float("inf"), "w12-C2e+10-seed0": None,
            "w12-C2e+10-seed1": 0.75}
    for run_id, end in ends.items():
        (out / "runs" / run_id).mkdir(parents=True)
        summary = {"steps": by_id[run_id].steps, "wall_s": 3.0, **({} if end is None else {"heldout_loss_end": end})}
        (out / "runs" / run_id / "summary.json").write_text(json.dumps(summary))  # NaN, Infinity: as json writes them
    (out / "runs" / "w12-C2e+10-seed1" / "metrics.csv").write_text("step,lr,x,train_loss\n8,0.1,0,0.8\n")
    lines: list[str] = []
    steps = {step.run.run_id: step for step in dry_run(spec, out, log=lines.append)}
    for run_id in ("w8-C2e+10-seed0", "w8-C2e+10-seed1"):
        with pytest.raises(Diverged):
            folder_row(spec, by_id[run_id], out / "runs" / run_id, None)
        assert steps[run_id].state.startswith("diverged in its folder (held-out loss") and steps[run_id].steps_left == 0
        assert "not a point" in steps[run_id].state and "not run again" in steps[run_id].state
    with pytest.raises(RuntimeError, match="held-out loss not measured"):
        folder_row(spec, by_id["w12-C2e+10-seed0"], out / "runs" / "w12-C2e+10-seed0", None)
    assert steps["w12-C2e+10-seed0"].state.startswith("FAILS in `scaling run`: finished in its folder without a "
                                                      "held-out loss")
    assert folder_row(spec, by_id["w12-C2e+10-seed1"], out / "runs" / "w12-C2e+10-seed1", None)["heldout_loss"] == 0.75
    assert steps["w12-C2e+10-seed1"].state == "finished in its folder: read, not run"
    summary = next(line for line in lines if line.startswith("12 runs: "))
    assert summary.startswith("12 runs: 3 done (0 recorded, 1 finished in their folders, 2 diverged: no rows), "
                              "1 failing, 0 refused, 8 left")
