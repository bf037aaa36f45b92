"""A sweep without training: spec expansion, the lr sweep's choice, skipping finished runs, reading run folders
finished elsewhere, the fit, the report and the emitted launch lines. Each run is a stub that leaves what a real run
leaves for the sweep to read (summary.json and metrics.csv); real runs through the same worker and the same
reading are tests/integration/test_scaling.py's."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shlex
import sys
import textwrap
import time

import pytest

from mixmae_scale.config import ConfigError
from mixmae_scale.scaling import commands, recorded, workers
from mixmae_scale.scaling import run as sweep_run
from mixmae_scale.scaling.fit import FitError
from mixmae_scale.scaling.in_process import MARKER, DeviceShare
from mixmae_scale.scaling.report import fit_results, read_results, write_report
from mixmae_scale.scaling.run import SweepError, run_sweep
from mixmae_scale.scaling.spec import PlannedRun, expand, load_spec
from mixmae_scale.scaling.workers import RunQueue, estimated_seconds

SIZES = """
sizes:
  - {{name: w8, model: {{embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 32, decoder_heads: 2}}}}
  - {{name: w12, model: {{embed_dim: 12, num_heads: [1, 2, 4, 4], decoder_dim: 48, decoder_heads: 2}}}}
  - {{name: w16, model: {{embed_dim: 16, num_heads: [1, 2, 4, 8], decoder_dim: 64, decoder_heads: 2}}}}
data_fractions: [1.0]
set: ["batch.micro=8", "batch.global_batch=8", "logging.every_steps=3", "logging.heldout_batches=2", "zero.stage=0",
      "data.shuffle_buffer=64"]
"""
ISO_FLOP = """
name: iso-flop
profile: tiny
shards: {shards}
budgets: [2.0e10, 4.0e10]
learning_rate: {{rule: inverse_width, base_width: 8, sweep: [0.005, 0.02]}}
cluster: {{gpus_per_node: 4, max_nodes: 2}}
""" + SIZES


def test_grid_and_iso_flop_expansions(demo_shards, tmp_path):
    spec_path = tmp_path / "grid.yaml"
    spec_path.write_text(f"name: grid\nprofile: tiny\nshards: {demo_shards}\nsteps: [6, 12]\n" + SIZES.format())
    grid = expand(load_spec(spec_path), 300)
    assert [r.run_id for r in grid][:2] == ["w8-d1-s6-seed0", "w8-d1-s12-seed0"]
    assert grid[1].flops == pytest.approx(2 * grid[0].flops) and grid[2].params > grid[0].params
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards))
    spec = load_spec(spec_path)
    runs = expand(spec, 300, base_lr=0.01)
    for run in runs:  # each run spends its budget to within half a step
        per_step = run.flops / run.steps
        assert abs(run.flops - run.budget) <= per_step / 2
    w8, w16 = (next(r for r in runs if r.size == s and r.budget == 2e10) for s in ("w8", "w16"))
    assert w8.steps > w16.steps and "optim.width_lr_base=8" in w16.overrides
    assert "optim.base_learning_rate=0.01" in w16.overrides



def stub_loss(run) -> float:
    """A held-out loss shaped like a real sweep's: each budget's minimum at the middle width (w12), and the lr
    sweep's best at 0.02."""
    lr = float(next(o for o in run.overrides if o.startswith("optim.base_learning_rate=")).split("=")[1])
    width = math.log(run.params / 80_000)
    return 0.6 + 0.1 * width ** 2 + 0.05 * abs(math.log(lr / 0.02)) - 1e-12 * run.flops


@pytest.fixture
def stub_runs(monkeypatch):
    """Replaces the worker process: each run writes its folder at once, after the sweep built its command line."""
    started: list[str] = []

    def worker(queue, share, job_args, finished, stop=None):
        while (item := queue.take()) is not None:
            index, run = item
            args = job_args(run)
            assert args[args.index("--max-steps") + 1] == str(run.steps)
            run_dir = pathlib.Path(args[args.index("--run-dir") + 1])
            run_dir.mkdir(parents=True, exist_ok=True)  # a killed run of the plan resumes in its folder
            loss = stub_loss(run)
            (run_dir / "metrics.csv").write_text(f"step,epoch,images_seen,loss\n{run.steps},1.0,0,{loss + 0.1}\n")
            (run_dir / "summary.json").write_text(json.dumps({"steps": run.steps, "heldout_loss_end": loss,
                                                              "wall_s": 1.0}))
            started.append(run.run_id)
            finished(index, run, 0, 1.0, "")

    monkeypatch.setattr(sweep_run, "worker", worker)
    return started


def test_iso_flop_sweep_with_lr_sweep_picks_the_lr_skips_finished_runs_reads_folders_fits_and_reports(
        demo_shards, tmp_path, stub_runs):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards))
    spec = load_spec(spec_path)
    out = tmp_path / "sweep"
    messages: list[str] = []
    rows = run_sweep(spec, out, log=messages.append, parallel=2)
    assert len(rows) == 6 and all(r["heldout_loss"] > 0 and r["budget"] in (2e10, 4e10) for r in rows)
    sweep = [json.loads(line) for line in (out / "lr_sweep.jsonl").read_text().splitlines()]
    assert len(sweep) == 2 and {r["size"] for r in sweep} == {"w8"}
    best = min(sweep, key=lambda r: r["heldout_loss"])["overrides"]
    assert "optim.base_learning_rate=0.02" in best and any(m.endswith("; base lr 0.02") for m in messages)
    assert len(stub_runs) == len(set(stub_runs)) == 8 and stub_runs[:2] == [r["run_id"] for r in sweep]
    assert all(o in rows[0]["overrides"] for o in best if o.startswith("optim.base_learning_rate"))
    assert all(r["lr_rule"].startswith("inverse_width") and "base lr" in r["lr_rule"] for r in rows)
    assert run_sweep(spec, out, log=messages.append, parallel=2) == [] and len(stub_runs) == 8
    assert sum("skipped" in m for m in messages) == 8  # the lr sweep's 2 and the study's 6
    assert messages[-2].startswith("sweep: 0 ran, 8 reused (finished earlier), 0 failed, in 0 min ")
    assert messages[-1].startswith(f"next: mixmae scaling report --out {out}")
    # Runs finished elsewhere (a cluster, from the emitted lines) are read from their folders, not rerun.
    kept = (out / "results.jsonl").read_text()
    (out / "results.jsonl").unlink()
    start = time.perf_counter()
    assert len(run_sweep(spec, out, log=messages.append, parallel=2)) == 6 and time.perf_counter() - start < 30
    assert sum("read from" in m for m in messages) == 6 and len(stub_runs) == 8
    assert sorted(json.loads(line)["heldout_loss"] for line in (out / "results.jsonl").read_text().splitlines()) == \
        sorted(json.loads(line)["heldout_loss"] for line in kept.splitlines())
    results = read_results(out / "results.jsonl")
    assert {r["sweep"] for r in results} == {spec.name}  # each row names its sweep (rows of two are refused)
    fit = fit_results(results, bootstrap=20)
    iso = fit["iso_flop"]
    # Two budgets, one seed per point: no law through fewer than 3 interior budgets, no interval, nothing identified.
    assert len(iso["minima"]) == 2 and iso["N_opt"]["exponent_5_95"] is None and not iso["N_opt"]["identified"]
    assert iso["N_opt"]["verdict"].startswith("not identified (") and iso["L_opt_of_C"].startswith("not fitted: ")
    report = write_report(results, fit, out / "report").read_text()
    assert "Iso-FLOP (approach 2)" in report and "**not identified (" in report
    assert all((out / "report" / name).stat().st_size > 1000 for name in ("loss_vs_compute.png", "iso_flop.png"))
    # An N*(C) figure only where some budget has an N* (an interior minimum); otherwise the report says why not.
    interior = iso["interior_budgets"]
    assert (out / "report" / "n_opt_vs_compute.png").exists() == bool(interior)
    assert ("n_opt_vs_compute.png not drawn: 0 of 2 budgets have an interior minimum" in report) == (not interior)
    # No law identified: nothing to predict with, so no predicted-vs-observed figure, and the report says why.
    assert not (out / "report" / "predicted_vs_observed.png").exists()
    assert "predicted_vs_observed.png not drawn: neither L(N, D) nor L(C) is identified" in report
    run_sweep(spec, out, emit_commands=out / "commands.txt")
    lines = (out / "commands.txt").read_text().splitlines()
    launches = [line for line in lines if line.startswith("mixmae launch tiny")]
    assert len(launches) == 8 and lines[0].startswith("# 1. the lr sweep")
    # global batch 8 on 4-GPU nodes: one node of 4 GPUs (micro 2), never more GPUs than the batch allows
    assert all("cluster.num_nodes=1" in line and "cluster.gpus_per_node=4" in line for line in launches)


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
    head = "name: x\nprofile: tiny\nshards: s\n"
    for body, said in (  # shapes that were a TypeError traceback, read letter by letter, cut short or silently empty
            ("sizes: 5\ndata_fractions: [1]\nsteps: [40]\n", "'sizes' must be a non-empty list, e.g. sizes: ["),
            ("sizes: tiny\ndata_fractions: [1]\nsteps: [40]\n", "'sizes' must be a non-empty list"),
            ("sizes: [tiny]\ndata_fractions: [1]\nsteps: [40.7]\n", "'steps' holds 40.7, not an integer"),
            ("sizes: [tiny]\ndata_fractions: [abc]\nsteps: [40]\n", "'data_fractions' holds 'abc', not a number"),
            ("sizes: [tiny]\ndata_fractions: [1]\nsteps: []\n", "'steps' must be a non-empty list"),
            ("sizes: [tiny]\ndata_fractions: [1]\nsteps: [40]\nset: batch.micro=32\n", "'set' must be a non-empty"),
            ("sizes: [tiny, tiny]\ndata_fractions: [1]\nsteps: [40]\n", "size names repeat (tiny)")):
        bad.write_text(head + body)
        with pytest.raises(ConfigError, match=re.escape(f"{bad}: {said}")):
            load_spec(bad)
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"run_id": "a", "params": 1}) + "\n")
    with pytest.raises(FitError, match="lacks images_seen, flops, heldout_loss"):
        read_results(results)
    results.write_text("{not json\n")
    with pytest.raises(FitError, match="results.jsonl:1: not JSON"):
        read_results(results)


def test_a_results_file_whose_last_line_was_cut_short_is_refused_saying_so_and_what_to_do(tmp_path):
    """A sweep killed while writing its last row left it without its newline; `scaling report` said only
    "results.jsonl:3: not JSON: Expecting ',' delimiter", as for a file mangled by hand. `scaling run` mends it
    (mend_last_line); the report now says what happened and that."""
    row = {"run_id": "a", "params": 10, "images_seen": 100, "flops": 1e9, "heldout_loss": 0.5, "seed": 0}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(row) + "\n" + json.dumps({**row, "run_id": "b", "seed": 1}) + "\n"
                       + json.dumps({**row, "run_id": "c"})[:30])
    with pytest.raises(FitError, match=re.escape(
            f"{results}:3: the last line was cut short (30 bytes without a newline: a sweep killed while writing it, "
            "or one still writing); `mixmae scaling run` with the spec and this --out removes it (its run is read "
            "again from its folder), or remove that line")):
        read_results(results)
    results.write_text(json.dumps(row) + "\n{not json\n" + json.dumps({**row, "run_id": "b", "seed": 1}) + "\n")
    with pytest.raises(FitError, match=re.escape(f"{results}:2: not JSON")):  # not the last line: mangled
        read_results(results)


@pytest.mark.parametrize("change, said", [
    ({"heldout_loss": float("nan")}, "run b: heldout_loss=nan; a point needs a finite number above zero"),
    ({"heldout_loss": None}, "run b: heldout_loss=None"),  # a TypeError traceback
    ({"heldout_loss": -0.5}, "run b: heldout_loss=-0.5"),  # fitted
    ({"params": "99148"}, "run b: params='99148'"),
    ({"run_id": "a"}, "run a repeats line 1; each run once"),  # the window pilot's rows twice: laws "identified"
    ({"run_id": "a-again", "params": 10},
     "run a-again repeats line 1 (run a: the same size, settings, data, N, D, C and seed)")])
def test_a_results_file_with_a_point_that_is_no_measurement_or_a_run_twice_is_refused_by_line(tmp_path, change, said):
    """Each was fitted (or crashed) before: a NaN loss turned a budget's minimum into an edge, and rows written
    twice counted as seeds, so a one-seed sweep had intervals and identified laws."""
    first = {"run_id": "a", "params": 10, "images_seen": 100, "flops": 1e9, "heldout_loss": 0.5, "seed": 0}
    second = {**first, "run_id": "b", "params": 20, **change}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(first) + "\n\n" + json.dumps(second) + "\n")
    with pytest.raises(FitError, match=re.escape(f"{results}:3: {said}")):
        read_results(results)
    for other in ({"seed": 1}, {"data_fraction": 0.5}, {"size": "w8-drop0.2"}):  # a measurement of its own each:
        # another seed, a grid's other data fraction, a size whose settings change neither N nor C
        results.write_text(json.dumps({**first, "data_fraction": 1.0, "size": "w8"}) + "\n"
                           + json.dumps({**first, "data_fraction": 1.0, "size": "w8", "run_id": "b", **other}) + "\n")
        assert [r["run_id"] for r in read_results(results)] == ["a", "b"]


def test_runs_start_by_budget_then_longest_first_and_one_that_cannot_be_read_back_fails_alone(
        demo_shards, tmp_path, stub_runs, monkeypatch):
    """One queue: the smallest budget's runs first (a sweep cut short leaves whole iso-FLOP curves), each budget's
    longest first (a long run started last would hold up the end); a finished run whose folder cannot be read is
    recorded as failed, and the others are recorded."""
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    planned = {run.run_id: run for run in expand(spec, spec.train_samples_for_plan(), base_lr=0.02)}
    read_back = sweep_run.folder_row

    def row(spec, run, run_dir, wall_s, subset=None):
        if run.run_id == "w12-C4e+10-seed0":
            raise OSError(f"{run_dir / 'summary.json'}: stale file handle")
        return read_back(spec, run, run_dir, wall_s, subset)

    monkeypatch.setattr(sweep_run, "folder_row", row)
    messages: list[str] = []
    with pytest.raises(SweepError, match=r"1 run failed \(w12-C4e\+10-seed0: its run folder cannot be read;"):
        run_sweep(spec, tmp_path / "out", log=messages.append, parallel=1)
    study = stub_runs[1:]  # after the lr sweep's one run
    order = [(planned[run_id].budget, -estimated_seconds(planned[run_id])) for run_id in study]
    assert sorted(study) == sorted(planned) and order == sorted(order)
    assert [budget for budget, _ in order] == [2e10] * 3 + [4e10] * 3 and order[0][1] < order[2][1]
    assert any("w12-C4e+10-seed0: failed (its run folder cannot be read)" in m and "stale file handle" in m
               for m in messages)
    recorded = [json.loads(line)["run_id"] for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(recorded) == sorted(set(planned) - {"w12-C4e+10-seed0"})


def test_a_run_whose_worker_was_killed_by_a_signal_is_reported_by_the_signals_name(
        demo_shards, tmp_path, stub_runs, monkeypatch):
    """A worker process killed by a signal ends with a negative code (Popen's -9 for SIGKILL): the sweep said
    "failed (exit -9)", which reads as the run's own exit status. The run's line, the sweep's last line and its error
    name the signal; SIGKILL gets no cause (the OOM killer, `kill -9`, a scheduler past its grace time: the exit
    status cannot tell them apart)."""
    import signal

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    stubbed = sweep_run.worker

    def worker(queue, share, job_args, finished, stop=None):
        def killed(index, run, code, wall_s, output):
            if run.run_id == "w12-C4e+10-seed0":
                code, output = -signal.SIGKILL, "step 3\n"
            finished(index, run, code, wall_s, output)
        stubbed(queue, share, job_args, killed, stop)

    monkeypatch.setattr(sweep_run, "worker", worker)
    messages: list[str] = []
    with pytest.raises(SweepError, match=re.escape("1 run failed (w12-C4e+10-seed0: killed by SIGKILL;")):
        run_sweep(spec, tmp_path / "out", log=messages.append, parallel=1)
    assert any(m.startswith("[") and "w12-C4e+10-seed0: failed (killed by SIGKILL):\nstep 3" in m for m in messages)
    assert "1 failed (w12-C4e+10-seed0: killed by SIGKILL)," in messages[-1]
    assert not any("exit -9" in m for m in messages)
    assert sweep_run.exit_reason(1) == "exit 1" and sweep_run.exit_reason(-signal.SIGTERM) == "killed by SIGTERM"
    assert sweep_run.exit_reason(-200) == "killed by signal 200"


def test_the_cost_estimates_constants_are_the_h100_loop_measurement_and_the_swin_b_flop_count():
    """scaling/workers.py's STEP_OVERHEAD_S and FLOP_RATE, which order a sweep's runs and which the GPU study's device
    time estimate (docs/scaling-example/gpu-iso-flop/) is built from: the H100 real loop's time per step over the
    bare step's, and its images/s times Swin-B's training FLOPs per image as models/flops.py counts them."""
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.flops import model_report

    root = pathlib.Path(__file__).resolve().parents[2]
    loop = json.loads((root / "benchmarks/results/gpu_fast_step/loop_overhead.json").read_text())
    real = next(r for r in loop["rows"] if r["variant"] == "real_loop")
    bare = next(r for r in loop["rows"] if r["variant"] == "bare_step")
    batch = loop["settings"]["batch"]
    overhead = batch / real["images_per_s"] - batch / bare["images_per_s"]
    assert overhead == pytest.approx(workers.STEP_OVERHEAD_S, abs=5e-4)
    per_image = model_report(load_resolved("swin_b").config.model)["train_flops_per_image"]
    assert per_image == pytest.approx(1.14e11, rel=0.005)
    assert real["images_per_s"] * per_image == pytest.approx(workers.FLOP_RATE, rel=0.01)


def test_a_diverged_run_is_said_and_left_out_on_every_pass_and_a_diverged_lr_scores_worst(
        demo_shards, tmp_path, stub_runs, monkeypatch):
    """A NaN held-out loss: the study's run is no point and no failure to retry (the same run diverges again), and
    the lr sweep's diverged lr loses (NaN in the comparison could win). On the next pass the diverged run's folder
    is complete and read back: said again, where it raised and ended the sweep."""
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards))
    spec = load_spec(spec_path)
    honest = stub_loss

    def loss(run):
        return float("nan") if run.run_id.startswith("lr0.02-") or run.run_id == "w12-C4e+10-seed0" else honest(run)

    monkeypatch.setitem(globals(), "stub_loss", loss)
    messages: list[str] = []
    rows = run_sweep(spec, tmp_path / "out", log=messages.append, parallel=1)
    planned = {run.run_id for run in expand(spec, spec.train_samples_for_plan(), base_lr=0.005)}
    assert {r["run_id"] for r in rows} == planned - {"w12-C4e+10-seed0"}
    assert any(m.startswith("lr sweep: 0.005 -> ") and m.endswith("0.02 -> inf; base lr 0.005") for m in messages)
    assert "0 failed, 2 diverged (lr0.02-w8-C2e+10-seed0, w12-C4e+10-seed0: not points)" in messages[-2]
    messages.clear()
    assert run_sweep(spec, tmp_path / "out", log=messages.append, parallel=1) == []
    assert any("w12-C4e+10-seed0: held-out loss nan at its end: it diverged" in m and "remove" in m
               for m in messages)
    assert "0 failed, 2 diverged" in messages[-2] and any(m.endswith("; base lr 0.005") for m in messages)


def test_a_spec_does_not_add_its_runs_to_another_sweeps_results(demo_shards, tmp_path, stub_runs):
    """Run ids do not name the spec: a renamed or another spec's runs went into the same results.jsonl, which the
    report then refused as two sweeps, with no way out."""
    import dataclasses

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    run_sweep(spec, tmp_path / "out", log=lambda m: None, parallel=1)
    with pytest.raises(SweepError, match=re.escape(f"holds runs of sweep {spec.name}, not of 'renamed'")):
        run_sweep(dataclasses.replace(spec, name="renamed"), tmp_path / "out", log=lambda m: None, parallel=1)


WORKER_STUB = textwrap.dedent(f"""
    import json, os, sys
    for line in sys.stdin:
        run_id = json.loads(line)["run_id"]
        if run_id == "dies":
            print("out of memory", flush=True)
            os._exit(3)
        sys.stdout.write(f"pid {{os.getpid()}} ran {{run_id}} (no newline before the marker)")
        print("{MARKER}", run_id, 1 if run_id == "fails" else 0, "0.5", flush=True)
""")


def _planned(run_id: str) -> PlannedRun:
    return PlannedRun(run_id, "w8", 1.0, 10, 0, (), 1000, 80, 1e9)


def test_a_worker_process_takes_at_most_k_runs_and_one_that_dies_takes_only_its_run(tmp_path):
    """Runs handed one at a time to a worker process (a stand-in for `in_process` that speaks its protocol): a new
    process after K runs; a process that dies fails the run it was on, and the next run gets a new process; a
    marker written after text without a newline is still found."""
    stub = tmp_path / "worker.py"
    stub.write_text(WORKER_STUB)
    names = ["a", "b", "c", "fails", "dies", "d"]
    queue = RunQueue([(number, _planned(name)) for number, name in enumerate(names, start=1)])
    finished: list[tuple] = []
    workers.worker(queue, DeviceShare("2 CPU cores", 1, 2, 1), lambda run: ["pretrain"],
                      lambda *reported: finished.append(reported), command=[sys.executable, str(stub)])
    assert [(index, run.run_id, code) for index, run, code, _, _ in finished] == \
        [(1, "a", 0), (2, "b", 0), (3, "c", 0), (4, "fails", 1), (5, "dies", 3), (6, "d", 0)]
    pids = [output.split()[1] if output.startswith("pid ") else None for *_, output in finished]
    assert pids[0] == pids[1] != pids[2] == pids[3] and pids[5] not in pids[:4]
    assert finished[0][3] == 0.5 and finished[0][4].endswith("ran a (no newline before the marker)")
    assert finished[4][4] == "out of memory\n" and queue.take() is None


def _record(run_dir: pathlib.Path, samples: int, tail: int) -> None:
    """A run.json with what `schedule_mismatch` reads: the train split's samples and the held-out tail cut from it."""
    where = str(run_dir.parent / "shards")
    data = [{"role": "train", "location": where, "split": "train", "samples": samples, "split_digest": "a"},
            {"role": "held-out", "location": where, "split": "train", "samples": tail, "train_tail": tail,
             "split_digest": "b"}]
    (run_dir / "run.json").write_text(json.dumps({
        "run": run_dir.name, "job": "pretrain", "created": "now", "status": "completed", "code": {}, "packages": {},
        "platform": {}, "data": data, "command": "", "world_size": 1, "precision": {}, "resumes": [],
        "launches": [{"commit": "abc"}]}))


def test_a_run_stopped_before_its_last_step_is_not_read_as_a_point(tmp_path):
    """A worker stopped by a signal (a time limit on the sweep) saves and writes its summary at the step it reached;
    that run is not a point of the study, and the error says the same command resumes it. A run whose own schedule
    ended before the plan's by what a held-out tail taken from its train split explains is a point, recorded with
    the steps, images and FLOPs it trained; the same shortfall without a tail is a run of another plan."""
    run_dir = tmp_path / "w8"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,epoch,images_seen,loss\n3,1.0,0,1.0\n")
    summary = {"steps": 3, "planned_steps": 10, "stopped_by_signal": True, "heldout_loss_end": 0.9, "wall_s": 1.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    spec = type("Spec", (), {"probe": False})()
    with pytest.raises(RuntimeError, match=r"run w8 \(.*\): stopped at step 3 of 10, .* resumes it"):
        recorded.folder_row(spec, _planned("w8"), run_dir, 1.0)
    assert not recorded.finished_here(run_dir, _planned("w8")) and recorded.other_plan(run_dir, _planned("w8")) is None
    (run_dir / "summary.json").write_text(json.dumps({**summary, "steps": 8, "planned_steps": 8,
                                                      "stopped_by_signal": False}))
    said = "its own schedule ends at step 8, the plan's at 10: a run of another plan"
    with pytest.raises(RuntimeError, match=re.escape(f"run w8 ({run_dir}): {said}")):
        recorded.folder_row(spec, _planned("w8"), run_dir, 1.0)  # no held-out tail: nothing shortens its epochs
    assert recorded.other_plan(run_dir, _planned("w8")).startswith(said)
    # 100 train samples, 24 held out, batch 8: 12 steps per epoch planned, 9 run; 10 steps planned end at 8.
    _record(run_dir, samples=100, tail=24)
    row = recorded.folder_row(spec, _planned("w8"), run_dir, 1.0)  # planned: 10 steps, 80 images, 1e9 FLOPs
    assert (row["steps"], row["planned_steps"], row["images_seen"], row["flops"]) == (8, 10, 64, 8e8)
    assert recorded.finished_here(run_dir, _planned("w8")) and recorded.other_plan(run_dir, _planned("w8")) is None
    _record(run_dir, samples=1000, tail=24)  # a tail that shortens 10 steps by 1 at most
    assert "a held-out tail allows 1 step fewer" in recorded.other_plan(run_dir, _planned("w8"))
    (run_dir / "summary.json").write_text(json.dumps({**summary, "steps": 11, "planned_steps": 11,
                                                      "stopped_by_signal": False}))
    assert recorded.other_plan(run_dir, _planned("w8")) is None  # epochs that round up a step (no --max-steps)


def test_a_run_folder_of_another_plan_is_refused_not_read_as_finished(demo_shards, tmp_path, stub_runs):
    """A folder of 5 steps planned 5 (an earlier spec's run, or one given --max-steps 5) for a plan of many more was
    read as finished, its summary's own end taken for the plan's, and binned at the full budget."""
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    out = tmp_path / "out"
    run = next(r for r in expand(spec, spec.train_samples_for_plan(), base_lr=0.02) if r.run_id == "w8-C4e+10-seed0")
    assert run.steps == 80
    run_dir = out / "runs" / run.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("step,epoch,images_seen,loss\n5,1.0,0,1.0\n")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 5, "planned_steps": 5, "heldout_loss_end": 0.9,
                                                      "wall_s": 1.0}))
    with pytest.raises(SweepError, match=re.escape(f"1 run folder holds a run of another plan: {run_dir}: its own "
                                                   "schedule ends at step 5, the plan's at 80: a run of another plan")
                       + ".*" + re.escape("Remove it to run this plan's runs there, or give the spec a new --out")):
        run_sweep(spec, out, log=lambda m: None, parallel=1)
    assert stub_runs == [] and not (out / "results.jsonl").exists()  # refused before the lr sweep


def test_rows_of_two_sweeps_joined_in_one_file_are_refused(tmp_path):
    """The window pilot's and the iso-FLOP pilot's rows in one file were fitted together, the two families pooled in
    a budget; a row without a budget among iso-FLOP rows dropped the iso-FLOP analysis without a word."""
    first = {"run_id": "a", "params": 10, "images_seen": 100, "flops": 1e9, "heldout_loss": 0.5, "seed": 0,
             "budget": 1e9, "sweep": "window-pilot"}
    results = tmp_path / "results.jsonl"
    for second, said in (({"sweep": "iso-flop-pilot"}, "rows of 2 sweeps ('window-pilot' from line 1, "
                                                       "'iso-flop-pilot' from line 2)"),
                         ({"budget": None, "sweep": None}, "results.jsonl:2: run b has no iso-FLOP budget")):
        results.write_text(json.dumps(first) + "\n" + json.dumps({**first, "run_id": "b", "seed": 1, **second}) + "\n")
        with pytest.raises(FitError, match=re.escape(said)):
            read_results(results)
    older = {k: v for k, v in first.items() if k != "sweep"}  # results written before rows named their sweep
    results.write_text(json.dumps(older) + "\n" + json.dumps({**first, "run_id": "b", "seed": 1}) + "\n")
    assert len(read_results(results)) == 2


def test_a_run_whose_heldout_loss_diverged_is_not_recorded_as_a_point(tmp_path):
    """summary.json keeps a NaN held-out loss as NaN; the sweep wrote it into results.jsonl as a point."""
    from mixmae_scale.scaling.recorded import folder_row
    from mixmae_scale.scaling.spec import PlannedRun

    run = PlannedRun("w4-seed0", "w4", 1.0, 4, 0, (), 10, 64, 1e9)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "planned_steps": 4, "heldout_loss_end":
                                                       float("nan"), "wall_s": 1.0}))
    with pytest.raises(RuntimeError, match="held-out loss nan at its end: it diverged, not a point"):
        folder_row(None, run, tmp_path, 1.0)


def test_a_results_file_cut_short_is_mended_and_a_line_that_is_no_row_is_refused_by_path_and_line(
        demo_shards, tmp_path, stub_runs):
    """A sweep killed while appending left a last line without its newline; the next append glued its row onto it,
    and from then on every `scaling run` failed with a bare JSON error naming no file."""
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    out = tmp_path / "out"
    run_sweep(spec, out, log=lambda m: None, parallel=1)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    cut = lines[-1][: len(lines[-1]) // 2]
    results.write_text("\n".join(lines[:-1]) + "\n" + cut)  # the last row cut short
    messages: list[str] = []
    run_sweep(spec, out, log=messages.append, parallel=1)
    assert f"{results}: its last line was cut short ({len(cut)} bytes without a newline: a write interrupted); " \
           "removed: that run is read again from its folder, or run again" in messages
    assert sum("finished run read from" in m for m in messages) == 1 and len(stub_runs) == 7  # nothing ran again
    assert sorted(results.read_text().splitlines()) == sorted(lines)
    assert len(read_results(results)) == 6
    results.write_text("\n".join(lines))  # a whole last row without its newline: kept
    run_sweep(spec, out, log=lambda m: None, parallel=1)
    assert results.read_text() == "\n".join(lines) + "\n"
    results.write_text("\n".join([lines[0], lines[1][:40] + lines[2], *lines[3:]]) + "\n")  # a glued line
    with pytest.raises(SweepError, match=re.escape(f"{results}:2: not JSON (") + ".*" +
                       re.escape("; each line is one finished run's row: mend or remove that line")):
        run_sweep(spec, out, log=lambda m: None, parallel=1)
    results.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(SweepError, match=re.escape(f"{results}:2: not a run's row (a JSON object with a run_id)")):
        run_sweep(spec, out, log=lambda m: None, parallel=1)


def test_two_sweeps_on_one_out_folder_are_refused_while_one_holds_it(demo_shards, tmp_path, stub_runs):
    """Both would have started the same pending runs into the same folders. The lock is the run folders' own
    (engine/run_lock.py) under another name: the kernel drops it with the holder, and the holder is named."""
    import os

    from mixmae_scale.engine import run_lock

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    out = tmp_path / "out"
    held = run_lock.take(out, ".sweep.lock")  # another `scaling run` holding the folder
    try:
        with pytest.raises(run_lock.RunFolderInUse, match=re.escape(f"{out} is in use by another `mixmae scaling "
                                                                    f"run` (host ") + f".*pid {os.getpid()}.*" +
                           re.escape("or give this one another --out")):
            run_sweep(spec, out, log=lambda m: None, parallel=1)
        assert stub_runs == []
    finally:
        held.release()
    run_sweep(spec, out, log=lambda m: None, parallel=1)
    assert len(stub_runs) == 7 and not (out / ".sweep.lock").exists()  # released when the sweep ends


@pytest.mark.parametrize("change, where, said", [
    (("batch.micro=8", "batch.micro=4"), "lr_sweep.jsonl:1: run lr0.02-w8-C2e+10-seed0",
     "overrides: batch.micro=8 recorded, batch.micro=4 planned"),
    (("rule: inverse_width, base_width: 8, ", "rule: fixed, "), "lr_sweep.jsonl:1: run lr0.02-w8-C2e+10-seed0",
     "overrides: optim.width_lr_base=8 recorded, - planned"),
    (("profile: tiny", "profile: tiny.yaml"), "lr_sweep.jsonl:1: run lr0.02-w8-C2e+10-seed0",
     "profile: 'tiny' recorded, "),
    # a size's model changed (not the lr sweep's smallest): the study's rows of it are refused
    (("decoder_dim: 48", "decoder_dim: 40"), "results.jsonl:", "run w12-C2e+10-seed0 (params: "),
    (("decoder_dim: 48", "decoder_dim: 40"), "results.jsonl:",
     "overrides: model.decoder_dim=48 recorded, model.decoder_dim=40 planned"),
])
def test_a_recorded_run_of_another_plan_under_the_same_id_is_refused_naming_row_and_key(
        demo_shards, tmp_path, stub_runs, change, where, said):
    """Run ids name size, budget and seed: a changed `set:`, size, lr rule or profile kept them, and every old row was
    skipped as done earlier, a point of another study fitted with the new one's."""
    import shutil

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    shutil.copy(pathlib.Path(__file__).resolve().parents[2] / "launch" / "profiles" / "tiny.yaml", tmp_path)
    out = tmp_path / "out"
    run_sweep(load_spec(spec_path), out, log=lambda m: None, parallel=1)
    plan = (out / "plan.json").read_text()
    spec_path.write_text(spec_path.read_text().replace(*change))
    results = where.split(":")[0]
    with pytest.raises(SweepError, match=re.escape(f"{out / where}") + ".*" + re.escape(said) + ".*" + re.escape(
            f"give the changed spec a new --out, or remove those rows from {results} and their folders from "
            f"{out / 'runs'} to run them again")):
        run_sweep(load_spec(spec_path), out, log=lambda m: None, parallel=1)
    assert len(stub_runs) == 7  # nothing ran
    # The refused spec's plan is not recorded: `scaling fit` and `report` took it, and fitted its runs' ids.
    assert (out / "plan.json").read_text() == plan


def test_rows_written_before_rows_named_their_profile_are_still_resumed(demo_shards, tmp_path, stub_runs):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    out = tmp_path / "out"
    run_sweep(spec, out, log=lambda m: None, parallel=1)
    for name in ("results.jsonl", "lr_sweep.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert all(row["profile"] == "tiny" and row["sources"] == [] for row in rows)
        (out / name).write_text("".join(json.dumps({k: v for k, v in row.items() if k not in ("profile", "sources")})
                                        + "\n" for row in rows))
    messages: list[str] = []
    run_sweep(spec, out, log=messages.append, parallel=1)
    assert len(stub_runs) == 7 and messages[-2].startswith("sweep: 0 ran, 7 reused")


def test_a_data_subset_is_made_again_for_other_shards(demo_shards, tmp_path):
    """`fraction-1/` made for one set was reused for the spec's new shards (or sources): every run read the old set."""
    import dataclasses
    import shutil

    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.scaling.subsets import run_data

    other = tmp_path / "other"
    shutil.copytree(demo_shards, other)
    manifest = json.loads((other / "dataset.json").read_text())
    train = manifest["splits"]["train"]
    train["shards"] = train["shards"][:4]  # another set: its first 4 shards
    train["samples"] = sum(shard["samples"] for shard in train["shards"])
    (other / "dataset.json").write_text(json.dumps(manifest))
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    first, _ = run_data(spec, 1.0, tmp_path / "out")
    second, _ = run_data(dataclasses.replace(spec, shards=str(other)), 1.0, tmp_path / "out")
    assert first != second
    for sets, shards in ((first, demo_shards), (second, other)):
        train = load_split(sets[0].split("=", 1)[1], "train")
        assert train.tar_url(0).startswith(str(shards)) and train.samples == load_split(shards, "train").samples


def test_a_renamed_spec_is_refused_before_its_lr_sweep_runs_into_the_other_sweeps_folder(
        demo_shards, tmp_path, stub_runs):
    import dataclasses

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    spec = load_spec(spec_path)
    run_sweep(spec, tmp_path / "out", log=lambda m: None, parallel=1)
    renamed = dataclasses.replace(spec, name="renamed", learning_rate=dataclasses.replace(spec.learning_rate,
                                                                                         sweep=(0.01,)))
    with pytest.raises(SweepError, match=re.escape("holds runs of sweep iso-flop, not of 'renamed'")):
        run_sweep(renamed, tmp_path / "out", log=lambda m: None, parallel=1)
    assert len(stub_runs) == 7 and not any(name.startswith("lr0.01") for name in stub_runs)


def test_a_data_fraction_is_recorded_as_read_and_one_whole_shards_miss_is_refused(demo_shards, tmp_path, stub_runs):
    """The demo's train split: 5 shards, 4 of 64 samples and one of 44. 0.1 is one shard, 64 samples, 0.213 of the
    set: 2.13x the fraction, recorded as 0.1. 0.6 is 3 shards (0.64, recorded as read); its ceil in floating point
    (0.6 x 5 = 3.0000000000000004) took 4, 0.853."""
    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.scaling.subsets import run_data

    spec_path = tmp_path / "sweep.yaml"
    text = ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]")
    spec_path.write_text(text.replace("data_fractions: [1.0]", "data_fractions: [0.1]"))
    with pytest.raises(ConfigError, match=re.escape(
            f"{spec_path}: data_fractions 0.1 of {demo_shards} ('train': 5 shards, 300 samples) is 1 whole shard, "
            "64 samples: 0.213 of the set, 2.13x the fraction (more than 10% off). Whole shards give 0.213 (1 "
            "shard), 0.427 (2 shards), 0.64 (3 shards): give one of those")):
        run_sweep(load_spec(spec_path), tmp_path / "out", log=lambda m: None, parallel=1)
    assert stub_runs == []
    spec_path.write_text(text.replace("data_fractions: [1.0]", "data_fractions: [0.6]"))
    spec = load_spec(spec_path)
    sets, samples = run_data(spec, 0.6, tmp_path / "out")
    assert len(load_split(sets[0].split("=", 1)[1], "train").names) == 3 and samples == 192
    rows = run_sweep(spec, tmp_path / "out", log=lambda m: None, parallel=1)
    assert len(rows) == 6 and all((r["data_fraction"], r["data_fraction_read"], r["train_samples_read"]) ==
                                  (0.6, 0.64, 192) for r in rows)


def _started_folder(args: list[str], capsys, finished_at: int | None = None) -> pathlib.Path:
    """The folder a run leaves when it is killed after its first checkpoint: config.yaml as its start wrote it (what
    `mixmae config show` prints for the profile and the --set list it was given), a checkpoint and its first metrics
    rows, no summary.json; `finished_at`: a run that ended there (its summary at that step). `args`: its `mixmae
    pretrain` arguments, or a `mixmae launch` line's."""
    from mixmae_scale.cli import main

    sets = [arg for before, arg in zip(args, args[1:], strict=False) if before == "--set"]
    profile = args[args.index("--profile") + 1] if "--profile" in args else args[2]
    if "--run-dir" in args:
        run_dir = pathlib.Path(args[args.index("--run-dir") + 1])
    else:
        named = dict(item.split("=", 1) for item in sets)
        run_dir = pathlib.Path(named["run.output_dir"]) / named["run.name"]
    capsys.readouterr()
    assert main(["config", "show", "--profile", profile, "--job", "pretrain", "--world-size", "1", "--set",
                 *sets]) == 0
    (run_dir / "checkpoints" / "step00000003").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(capsys.readouterr().out)
    (run_dir / "metrics.csv").write_text("step,epoch,images_seen,loss\n3,0.1,24,1.0\n")
    if finished_at is not None:
        (run_dir / "metrics.csv").write_text(f"step,epoch,images_seen,loss\n{finished_at},1.0,0,1.0\n")
        (run_dir / "summary.json").write_text(json.dumps({"steps": finished_at, "planned_steps": finished_at,
                                                          "heldout_loss_end": 0.9, "wall_s": 1.0}))
    return run_dir


@pytest.mark.parametrize("change, old_lr, finished, said, ran", [
    (("base_width: 8", "base_width: 12"), 0.02, False, "optim.width_lr_base 8 in the folder, 12 planned", []),
    (("decoder_dim: 48", "decoder_dim: 40"), 0.02, False, "model.decoder_dim 48 in the folder, 40 planned", []),
    (('"batch.global_batch=8"', '"batch.global_batch=16"'), 0.02, False,
     "batch.global_batch 8 in the folder, 16 planned", []),
    # the base lr is the lr sweep's to choose: the folder is judged on it once the lr sweep has run, before the study
    ((), 0.005, False, "optim.base_learning_rate 0.005 in the folder, 0.02 planned", ["lr0.02-w8-C2e+10-seed0"]),
    # a finished run of the same steps under another lr rule was read back as a point of this plan
    (("base_width: 8", "base_width: 12"), 0.02, True, "optim.width_lr_base 8 in the folder, 12 planned", []),
])
def test_a_started_run_of_another_plan_in_its_folder_is_refused_naming_folder_and_keys(
        demo_shards, tmp_path, stub_runs, capsys, change, old_lr, finished, said, ran):
    """A killed run (checkpoints, no summary yet) of an earlier spec under the same run id was resumed by the new plan:
    another lr rule or base lr went on from its weights without a word and the mixed run became a point; another
    model or batch failed inside the run (`pretrain`'s remedy, --overwrite, which the sweep does not take) after the
    runs before it had run, and "run the same `mixmae scaling run` again" failed the same way."""
    spec_path = tmp_path / "sweep.yaml"
    text = ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]")
    spec_path.write_text(text)
    old = load_spec(spec_path)
    run = next(r for r in expand(old, old.train_samples_for_plan(), base_lr=old_lr) if r.run_id == "w12-C4e+10-seed0")
    out = tmp_path / "out"
    run_dir = _started_folder(commands.pretrain_args(old, run, out, 1), capsys,
                              run.steps if finished else None)
    spec_path.write_text(text.replace(*change) if change else text)
    with pytest.raises(SweepError, match=re.escape(f"1 run folder holds a run of another plan: {run_dir}: ") + ".*"
                       + re.escape(said) + ".*" + re.escape("Remove it to run this plan's runs there, or give the "
                                                            "spec a new --out")):
        run_sweep(load_spec(spec_path), out, log=lambda m: None, parallel=1)
    assert stub_runs == ran and not (out / "results.jsonl").exists()


@pytest.mark.parametrize("where", ["here", "emitted without the manifest"])
def test_a_started_run_of_this_plan_resumes_in_its_folder(demo_shards, tmp_path, stub_runs, capsys, where):
    """What the check above must not refuse: this plan's own killed run, started here (its base lr the lr sweep's,
    its data the subset folder, its threads this machine's) or from a line emitted where the shards' manifest could
    not be read (the set itself, a cluster's world size and output folder)."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]")
                         + "train_samples: 300\n")
    spec = load_spec(spec_path)
    out = tmp_path / "out"
    run = next(r for r in expand(spec, 300, base_lr=0.02) if r.run_id == "w12-C4e+10-seed0")
    if where == "here":
        args = commands.pretrain_args(spec, run, out, 1)
    else:
        shards.rename(tmp_path / "away")
        args = shlex.split(commands.launch_line(spec, run, out, 300))
        (tmp_path / "away").rename(shards)
        assert f"data.shards={shards}" in args
    run_dir = _started_folder(args, capsys)
    rows = run_sweep(spec, out, log=lambda m: None, parallel=1)
    assert run.run_id in stub_runs and len(rows) == 6 and (run_dir / "summary.json").exists()


GRID_MIXTURE = """
name: grid-mixture
profile: tiny
shards: {shards}
train_samples: 900
steps: [12]
sizes:
  - {{name: w8, model: {{embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 32, decoder_heads: 2}}}}
data_fractions: [{fractions}]
set: ["batch.micro=8", "batch.global_batch=8", "zero.stage=0"]
sources:
  - {{shards: {shards}, weight: 2}}
  - {{shards: {shards}, weight: 1, split: train}}
"""


def _emitted_sets(commands: pathlib.Path) -> dict[str, dict[str, str]]:
    """Each emitted run's --set values by key, by run id."""
    lines = [shlex.split(line) for line in commands.read_text().splitlines() if line.startswith("mixmae launch")]
    sets = [dict(arg.split("=", 1) for before, arg in zip(line, line[1:], strict=False) if before == "--set")
            for line in lines]
    return {named["run.name"]: named for named in sets}


def test_lines_emitted_where_the_shards_cannot_be_read_train_on_the_mixture_with_the_schedule_of_a_run_here(
        demo_shards, tmp_path):
    """Emitted where the shards' manifests could not be read, the lines named the one set (`shards:`) and no
    `data.sources`: every run trained on the held-out set instead of the mixture, its epochs counted from
    `train_samples` where a run here counts its subsets' samples. At data fraction 1 a run's subsets hold every
    training shard of each set: the lines name the sets themselves, with the weights and splits and the schedule a
    run here is given (`train_samples: 900` is the mixture's weighted count, 2 x 300 + 300)."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(GRID_MIXTURE.format(shards=shards, fractions="1.0"))
    spec = load_spec(spec_path)
    run_sweep(spec, tmp_path / "out", emit_commands=tmp_path / "here.sh", log=lambda m: None)
    shards.rename(tmp_path / "away")
    run_sweep(spec, tmp_path / "out", emit_commands=tmp_path / "elsewhere.sh", log=lambda m: None)
    (here,) = _emitted_sets(tmp_path / "here.sh").values()
    (elsewhere,) = _emitted_sets(tmp_path / "elsewhere.sh").values()
    assert elsewhere["data.shards"] == str(shards)
    assert json.loads(elsewhere["data.sources"]) == [{"shards": str(shards), "weight": 2.0, "split": "train"},
                                                     {"shards": str(shards), "weight": 1.0, "split": "train"}]
    assert [(s["weight"], s["split"]) for s in json.loads(here["data.sources"])] == [(2.0, "train"), (1.0, "train")]
    assert {k: v for k, v in elsewhere.items() if not k.startswith("data.")} == \
        {k: v for k, v in here.items() if not k.startswith("data.")}  # schedule.epochs among them: 12 / (900 // 8)


def test_a_data_fraction_emitted_where_the_shards_cannot_be_read_is_refused_naming_what_is_missing(
        demo_shards, tmp_path):
    """A fraction below 1 reads the first whole shards of each set; which they are and how many samples they hold is
    in the set's manifest. The lines pointed every fraction at the whole set (a 0.6 run trained on all of it) with
    epochs from 0.6 x train_samples, and the whole-shard check (more than 10% off) never ran: refused now, before a
    line is written, naming the fraction, the manifest and the ways out."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(GRID_MIXTURE.format(shards=shards, fractions="0.6, 1.0"))
    spec = load_spec(spec_path)
    shards.rename(tmp_path / "away")
    commands = tmp_path / "commands.sh"
    with pytest.raises(ConfigError, match=re.escape(f"{spec_path}: data_fractions 0.6: ") + ".*" + re.escape(
            f"{shards / 'dataset.json'}") + ".*cannot be read here.*" + re.escape("data_fractions: [1.0]")):
        run_sweep(spec, tmp_path / "out", emit_commands=commands, log=lambda m: None)
    assert not commands.exists()
    spec_path.write_text(GRID_MIXTURE.format(shards=shards, fractions="0.6, 1.0").replace("train_samples: 900\n", ""))
    with pytest.raises(ConfigError, match=re.escape("record 'train_samples: N' in the sweep spec")) as said:
        run_sweep(load_spec(spec_path), tmp_path / "out", emit_commands=commands, log=lambda m: None)
    assert "--train-samples" not in str(said.value)  # `scaling plan`'s option: `scaling run` has none


def test_rows_of_runs_the_spec_no_longer_plans_are_left_out_of_the_fit_and_named(demo_shards, tmp_path, stub_runs,
                                                                                  capsys):
    """A budget dropped from the spec left its rows in results.jsonl, and `scaling report` (which reads the folder,
    not the spec) fitted them with the spec's points: three budgets' minima for a spec of two. The rows stay in the
    file (runs that happened); `scaling run` records its plan (plan.json), and the fit and the report take its runs
    only, saying how many were left out and which; the plan's own rows fit exactly as they do alone."""
    from mixmae_scale.cli import main

    spec_path = tmp_path / "sweep.yaml"
    text = ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]")
    spec_path.write_text(text.replace("budgets: [2.0e10, 4.0e10]", "budgets: [2.0e10, 4.0e10, 8.0e10]"))
    out = tmp_path / "out"
    run_sweep(load_spec(spec_path), out, log=lambda m: None, parallel=1)
    spec_path.write_text(text)  # 8e10 dropped
    messages: list[str] = []
    run_sweep(load_spec(spec_path), out, log=messages.append, parallel=1)
    dropped = ["w12-C8e+10-seed0", "w16-C8e+10-seed0", "w8-C8e+10-seed0"]
    assert any(m.startswith("3 recorded runs are not in the spec's plan now (" + ", ".join(dropped) + ")")
               for m in messages)
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 9 and len(stub_runs) == 10  # nothing ran again; the rows stay in the file
    capsys.readouterr()
    assert main(["scaling", "report", "--out", str(out), "--bootstrap", "20"]) == 0
    said = capsys.readouterr().err
    assert f"3 rows of {out / 'results.jsonl'} are runs the spec no longer plans" in said
    assert ", ".join(dropped) in said
    fit = json.loads((out / "fit.json").read_text())
    assert fit["runs"] == 6 and fit["not_in_plan"]["runs"] == dropped
    assert [m["budget"] for m in fit["iso_flop"]["minima"]] == [2e10, 4e10]
    alone = json.loads(json.dumps(fit_results([r for r in rows if r["run_id"] not in dropped], bootstrap=20)))
    assert {k: v for k, v in fit.items() if k not in ("not_in_plan", "results")} == alone
    assert fit["results"]["rows"] == 9  # the file's rows, the dropped runs' among them
    report = (out / "report" / "report.md").read_text()
    assert "3 rows of results.jsonl are left out: runs the spec no longer plans (" + ", ".join(dropped) in report
    assert not any(f"| {run_id} |" in report for run_id in dropped)
    spec_path.write_text(text + "# edited after the plan was recorded\n")  # the report takes the plan recorded
    assert main(["scaling", "fit", "--out", str(out), "--bootstrap", "0"]) == 0
    assert f"{spec_path} has changed since `mixmae scaling run` recorded its plan" in capsys.readouterr().err


def test_planned_runs_without_a_row_are_named_by_the_fit_and_the_report_with_why(demo_shards, tmp_path, stub_runs,
                                                                                  monkeypatch, capsys):
    """Every run of a budget diverged (an lr too high at that budget) and one run of the other never finished: the
    report fitted what was left and said nothing of the plan's other runs: the diverged budget vanished from it, and a
    budget's parabola drawn through the sizes that survived read as that budget's whole measurement. The fit and the
    report now name each planned run without a row, and why: diverged (its folder's held-out loss is not finite),
    started but not finished, or not started."""
    from mixmae_scale.cli import main

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace("sweep: [0.005, 0.02]", "sweep: [0.02]"))
    honest = stub_loss

    def loss(run):
        return float("nan") if run.budget == 4e10 else honest(run)

    monkeypatch.setitem(globals(), "stub_loss", loss)
    out = tmp_path / "out"
    run_sweep(load_spec(spec_path), out, log=lambda m: None, parallel=1)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(line for line in lines if "w16-C2e+10" not in line) + "\n")
    (out / "runs" / "w16-C2e+10-seed0" / "summary.json").unlink()  # killed before its end
    capsys.readouterr()
    assert main(["scaling", "report", "--out", str(out), "--bootstrap", "0"]) == 0
    said = capsys.readouterr().err
    diverged = ["w12-C4e+10-seed0", "w16-C4e+10-seed0", "w8-C4e+10-seed0"]
    assert ("4 of the plan's 6 runs have no row in results.jsonl and are not in the fit: 3 diverged ("
            + ", ".join(diverged) + "), 1 started but not finished (w16-C2e+10-seed0)") in said
    fit = json.loads((out / "fit.json").read_text())
    assert fit["not_recorded"]["runs"] == {**{run_id: "diverged" for run_id in diverged},
                                           "w16-C2e+10-seed0": "started but not finished"}
    report = (out / "report" / "report.md").read_text()
    assert "**4 of the plan's 6 runs have no row in results.jsonl and are not in the fit: 3 diverged (" in report


def test_a_ctrl_c_during_a_sweep_starts_no_further_run_and_says_what_ran_stopped_and_did_not_start(
        demo_shards, tmp_path, monkeypatch):
    """Ctrl-C in the second run: the main thread's KeyboardInterrupt left the workers' threads to start every run
    still queued (the sweep ran to its end, then printed a traceback). Now the run in flight is stopped (its folder
    says so: a stop's summary, resumed by the next `scaling run`), no run starts after it, and the sweep ends with
    the counts. The signal is the real SIGINT, caught by the sweep's own handler in this (the main) thread."""
    import signal

    started: list[str] = []

    def worker(queue, share, job_args, finished, stop=None):
        while (item := queue.take()) is not None:
            index, run = item
            args = job_args(run)
            run_dir = pathlib.Path(args[args.index("--run-dir") + 1])
            run_dir.mkdir(parents=True, exist_ok=True)
            started.append(run.run_id)
            steps, stopped = run.steps, len(started) == 2
            if stopped:
                signal.raise_signal(signal.SIGINT)
                deadline = time.monotonic() + 5
                while not getattr(queue, "stopped", False) and time.monotonic() < deadline:
                    time.sleep(0.01)
                steps = run.steps // 2  # saved at a step boundary, as pretrain does on the worker's SIGTERM
            (run_dir / "metrics.csv").write_text(f"step,epoch,images_seen,loss\n{steps},1.0,0,0.9\n")
            (run_dir / "summary.json").write_text(json.dumps({"steps": steps, "planned_steps": run.steps,
                                                              "stopped_by_signal": stopped,
                                                              "heldout_loss_end": 0.8, "wall_s": 1.0}))
            finished(index, run, 0, 1.0, "")

    monkeypatch.setattr(sweep_run, "worker", worker)
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(ISO_FLOP.format(shards=demo_shards).replace(", sweep: [0.005, 0.02]", ""))
    spec = load_spec(spec_path)
    planned = len(expand(spec, spec.train_samples_for_plan()))
    out = tmp_path / "sweep"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SweepError) as said:
        run_sweep(spec, out, log=lambda line: None)
    assert len(started) == 2 and [r["run_id"] for r in read_results(out / "results.jsonl")] == started[:1]
    assert str(said.value).startswith(f"sweep stopped by SIGINT: 1 ran, 0 reused (finished earlier), 1 stopped before "
                                      f"their end ({started[1]}), {planned - 2} not started, in ")
    assert signal.getsignal(signal.SIGINT) is before  # the sweep's handler was there while its runs were


STOPPED_WORKER = textwrap.dedent(f"""
    import json, pathlib, signal, sys, time
    asked = []
    signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))
    for line in sys.stdin:
        run_id = json.loads(line)["run_id"]
        pathlib.Path(sys.argv[1]).write_text(run_id)
        while not asked:
            time.sleep(0.01)
        print("saved at the next step boundary on SIGTERM", flush=True)
        print("{MARKER}", run_id, 0, "0.5", flush=True)
""")


def test_a_stopped_sweep_sends_sigterm_to_each_worker_and_hands_out_no_further_run(tmp_path):
    """A SIGTERM to the sweep's own process (`kill PID`) reached none of its workers: they trained on, orphaned.
    The stop (the sweep's handler, called as the signal calls it) now signals each worker process, whose run saves
    and reports, and the queue hands out nothing more."""
    import signal
    import threading

    stub, began = tmp_path / "worker.py", tmp_path / "began"
    stub.write_text(STOPPED_WORKER)
    queue = RunQueue([(1, _planned("a")), (2, _planned("b"))])
    stop = workers.SweepStop(queue)
    finished: list[tuple] = []
    thread = threading.Thread(target=workers.worker, args=(
        queue, DeviceShare("2 CPU cores", 1, 2, 1), lambda run: ["pretrain"], lambda *said: finished.append(said),
        [sys.executable, str(stub), str(began)]), kwargs={"stop": stop})
    thread.start()
    deadline = time.monotonic() + 20
    while not began.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop(signal.SIGTERM)
    thread.join(20)
    assert not thread.is_alive()
    assert [(index, run.run_id, code) for index, run, code, _, _ in finished] == [(1, "a", 0)]
    assert "saved at the next step boundary on SIGTERM" in finished[0][4]
    assert queue.left() == 1 and queue.take() is None and stop.name == "SIGTERM"


def test_a_sweep_on_a_set_too_small_for_a_hold_out_is_refused_before_its_first_run(tmp_path, stub_runs):
    """data.heldout=auto on a set under 16 images without a validation split holds out nothing, and a run trains
    without a held-out loss. A sweep compares held-out losses: it trained every run to the end and only then failed
    each with "held-out loss not measured". It is refused before the first run (the lr sweep's too), naming the
    set and what to do."""
    from tests.unit.test_heldout import write_set

    shards = write_set(tmp_path / "tiny", sizes=(7, 5))
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(f"name: tiny\nprofile: tiny\nshards: {shards}\nsteps: [3]\n"
                         "learning_rate: {rule: fixed, sweep: [0.005, 0.02]}\n" + SIZES.format())
    with pytest.raises(SweepError) as refused:
        run_sweep(load_spec(spec_path), tmp_path / "out", log=lambda line: None)
    assert stub_runs == []
    assert str(refused.value) == (
        f"{spec_path}: shards {shards} have no split 'val' (data.val_split), and the 'train' split a run reads has "
        "12 samples, fewer than the 16 a hold-out of its tail needs: data.heldout=auto holds out nothing, and every "
        "run would train to its end without the held-out loss a sweep compares; give the set a 'val' split of at "
        "least batch.micro images: convert the images again with one (`mixmae shards folder --src SRC --out NEW "
        "--val-fraction F`, F large enough to hold out that many)")


@pytest.mark.parametrize("moved", ["the sweep folder", "the shards", "both"])
def test_a_sweep_moved_to_another_mount_reads_back_its_runs_and_resumes_the_killed_one_on_the_same_data(
        demo_shards, tmp_path, stub_runs, capsys, moved):
    """A sweep folder or its shard set (or both) copied to another mount, the spec's `shards` naming the set where it
    is now: finished rows are read back, a finished folder not yet recorded is read, not rerun, and a killed run
    resumes on its subset made again for the new location, whose training data (`data_identity`, what a checkpoint's
    resume compares) is the same shards'. The subset was keyed on the set's absolute location and named every tar by
    its absolute path: a moved set gave every unrecorded folder "data.shards ... in the folder, ... planned" and
    another data identity."""
    import shutil

    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.data.shard_sets import training_mixture
    from mixmae_scale.engine.checkpointing.recipe import data_content, data_identity
    from mixmae_scale.scaling.subsets import subset_shards

    def sweep_at(mount: pathlib.Path) -> tuple:
        spec_path = mount / "sweep.yaml"
        spec_path.write_text(ISO_FLOP.format(shards=mount / "shards").replace("sweep: [0.005, 0.02]", "sweep: [0.02]")
                             .replace("data_fractions: [1.0]", "data_fractions: [0.6]"))
        return load_spec(spec_path), mount / "out"

    def identity(spec, out) -> tuple:
        mixture = training_mixture(str(subset_shards(spec.shards, 0.6, out / "data")), "train", [])
        return data_identity(mixture), data_content(mixture)

    shutil.copytree(demo_shards, tmp_path / "a" / "shards")
    spec, out = sweep_at(tmp_path / "a")
    run_sweep(spec, out, log=lambda m: None, parallel=1)
    assert len(stub_runs) == 7
    runs = {r.run_id: r for r in expand(spec, spec.train_samples_for_plan(), base_lr=0.02)}
    killed, finished = runs["w12-C4e+10-seed0"], runs["w16-C2e+10-seed0"]
    rows = [line for line in (out / "results.jsonl").read_text().splitlines()
            if json.loads(line)["run_id"] not in (killed.run_id, finished.run_id)]
    (out / "results.jsonl").write_text("".join(line + "\n" for line in rows))
    for run, end in ((killed, None), (finished, finished.steps)):
        shutil.rmtree(out / "runs" / run.run_id)
        _started_folder(commands.pretrain_args(spec, run, out, 1), capsys, end)
    before = identity(spec, out)
    parts = {"the sweep folder": ["out"], "the shards": ["shards"], "both": ["out", "shards"]}[moved]
    for part in parts:
        shutil.copytree(tmp_path / "a" / part, tmp_path / "b" / part)
    here = tmp_path / ("b" if moved != "the sweep folder" else "a")
    spec, _ = sweep_at(here)
    out = tmp_path / ("a" if moved == "the shards" else "b") / "out"
    if moved != "the sweep folder":
        shutil.rmtree(tmp_path / "a" / "shards")  # the old mount is gone
    messages: list[str] = []
    run_sweep(spec, out, log=messages.append, parallel=1)
    assert stub_runs[7:] == [killed.run_id]
    assert messages[-2].startswith("sweep: 1 ran, 6 reused (finished earlier), 0 failed")
    assert any(m.endswith(f"{finished.run_id}: finished run read from {out / 'runs' / finished.run_id}")
               for m in messages)
    subset = subset_shards(spec.shards, 0.6, out / "data")
    assert load_split(subset, "train").tar_url(0).startswith(str(here / "shards"))
    assert identity(spec, out) == before and None not in before


@pytest.mark.parametrize("where", ["at its old path", "at another path"])
def test_rows_and_folders_of_another_set_are_refused_at_its_old_path_or_another(
        demo_shards, tmp_path, stub_runs, capsys, where):
    """What a move must not let through: the set rebuilt (the same names, sizes and counts, other tars: its
    manifest's sha256s differ), at the spec's old path or a new one. Rows recorded their overrides' `data.shards`,
    the set's path, and nothing of what it held: the set rebuilt in place gave every recorded row as a point of the
    new data. A killed run's folder names its subset, made for the old set: refused."""
    import shutil

    from mixmae_scale.scaling.subsets import subset_shards

    shards = tmp_path / "a" / "shards"
    shutil.copytree(demo_shards, shards)
    spec_path = tmp_path / "sweep.yaml"
    text = (ISO_FLOP.replace("sweep: [0.005, 0.02]", "sweep: [0.02]")
            .replace("data_fractions: [1.0]", "data_fractions: [0.6]"))
    spec_path.write_text(text.format(shards=shards))
    spec, out = load_spec(spec_path), tmp_path / "out"
    run_sweep(spec, out, log=lambda m: None, parallel=1)
    killed = next(r for r in expand(spec, spec.train_samples_for_plan(), base_lr=0.02)
                  if r.run_id == "w12-C4e+10-seed0")
    shutil.rmtree(out / "runs" / killed.run_id)
    _started_folder(commands.pretrain_args(spec, killed, out, 1), capsys)
    (out / "runs" / killed.run_id).rename(tmp_path / "aside")
    kept = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("".join(f"{line}\n" for line in kept if killed.run_id not in line))
    old = f"data/{subset_shards(spec.shards, 0.6, out / 'data').name}"
    rebuilt = shards if where == "at its old path" else tmp_path / "b" / "shards"
    if rebuilt != shards:
        shutil.copytree(shards, rebuilt)
    manifest = json.loads((rebuilt / "dataset.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (rebuilt / "dataset.json").write_text(json.dumps(manifest))
    spec_path.write_text(text.format(shards=rebuilt))
    spec = load_spec(spec_path)
    with pytest.raises(SweepError, match=re.escape(f"{out / 'lr_sweep.jsonl'}:1: run lr0.02-w8-C2e+10-seed0 (") + ".*"
                       + re.escape(f"data_subsets: ['{old}'] recorded, ['data/fraction-0.6-")):
        run_sweep(spec, out, log=lambda m: None, parallel=1)
    (tmp_path / "aside").rename(out / "runs" / killed.run_id)
    with pytest.raises(SweepError, match=re.escape(f"{out / 'runs' / killed.run_id}: an unfinished run (no "
                                                   f"summary.json) whose config.yaml is not this plan's (data.shards "
                                                   f"{old} in the folder, data/fraction-0.6-")):
        run_sweep(spec, out, log=lambda m: None, parallel=1)
    assert len(stub_runs) == 7


def test_a_subset_made_before_subsets_were_keyed_on_their_set_alone_is_still_used_where_the_set_is(
        demo_shards, tmp_path):
    """Its killed runs' checkpoints recorded its absolute tar names, and their config.yaml its name: a new subset
    beside it would have refused them as another plan. Moved, the set gets a subset keyed on what it is."""
    import shutil

    from mixmae_scale.data.manifest import read_manifest
    from mixmae_scale.scaling import subsets

    shards = tmp_path / "a" / "shards"
    shutil.copytree(demo_shards, shards)
    legacy = tmp_path / "data" / subsets._subset_name(0.6, [str(shards), "train", read_manifest(shards)])
    shutil.copytree(subsets.subset_shards(shards, 0.6, tmp_path / "elsewhere"), legacy)
    assert subsets.subset_shards(shards, 0.6, tmp_path / "data") == legacy
    shutil.copytree(shards, tmp_path / "b" / "shards")
    moved = subsets.subset_shards(tmp_path / "b" / "shards", 0.6, tmp_path / "data")
    assert moved != legacy and moved.name == subsets.subset_shards(shards, 0.6, tmp_path / "elsewhere").name


MIXTURE_WITHOUT_VAL = """name: mixture
profile: tiny
shards: {shards}
steps: [3]
sizes: [{{name: w8, model: {{embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 32, decoder_heads: 2}}}}]
data_fractions: [{fraction}]
set: ["batch.micro=8", "batch.global_batch=8", "zero.stage=0", "logging.heldout_batches=2"]
sources:
  - {{shards: {shards}, weight: 2}}
  - {{shards: {other}, weight: 1}}
"""


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_a_mixture_that_trains_on_its_heldout_set_leaves_out_the_heldout_tail(tmp_path, fraction):
    """`shards` gives a mixture's held-out images; without a validation split they are the tail of its subset's
    train split. The same set among the sources is another subset folder (OUT/data/source0/...), which the run's
    cut of the tail (by the set's location) did not know for the same set: training read the held-out images."""
    from mixmae_scale.config import load_config
    from mixmae_scale.data.heldout import choose_heldout, heldout_count
    from mixmae_scale.data.shard_sets import training_mixture
    from mixmae_scale.scaling.subsets import run_data
    from tests.unit.test_heldout import write_set

    shards, other = write_set(tmp_path / "set", sizes=(40, 40)), write_set(tmp_path / "other", sizes=(40, 40))
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(MIXTURE_WITHOUT_VAL.format(shards=shards, other=other, fraction=fraction))
    spec = load_spec(spec_path)
    sets, _ = run_data(spec, fraction, tmp_path / "out")
    config, _ = load_config(spec.profile, None, [*spec.overrides, *sets])  # as `pretrain` reads them
    data = config.data
    heldout = choose_heldout(data.shards, data.train_split, data.val_split, data.heldout,
                             heldout_count(config.logging.heldout_batches, config.batch.micro))
    trained = heldout.exclude_from(training_mixture(data.shards, data.train_split,
                                                    [(s.shards, s.weight, s.split) for s in data.sources]))
    assert heldout.train_tail == 16 and [entry.shards.samples for entry in trained.sets] == [
        round(80 * fraction) - 16, round(80 * fraction)]
    held = {f"{shard}:{line}" for shard, first, lines in zip(heldout.images.tars, heldout.images.first_line,
                                                              heldout.images.samples_per_shard, strict=True)
            for line in range(first, first + lines)}
    read = {f"{entry.shards.tars[shard]}:{line}" for entry in trained.sets
            for shard in range(len(entry.shards.names))
            for line in range(entry.shards.first_line_of(shard),
                              entry.shards.first_line_of(shard) + entry.shards.samples_per_shard[shard])}
    assert len(held) == 16 and not held & read


def test_a_mixture_whose_heldout_set_is_too_small_is_refused_saying_it_gives_only_the_heldout_images(
        tmp_path, stub_runs):
    """With sources a run trains on them and `shards` gives only the held-out images: the refusal said "the 'train'
    split a run reads", a split the run does not train on."""
    from tests.unit.test_heldout import write_set

    shards, other = write_set(tmp_path / "set", sizes=(7, 5)), write_set(tmp_path / "other", sizes=(40, 40))
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(MIXTURE_WITHOUT_VAL.format(shards=shards, other=other, fraction=1.0))
    with pytest.raises(SweepError) as refused:
        run_sweep(load_spec(spec_path), tmp_path / "out", log=lambda line: None)
    assert stub_runs == []
    assert str(refused.value).startswith(
        f"{spec_path}: shards {shards} (with sources: the held-out images alone; training reads the sources) have "
        "no split 'val' (data.val_split), and the 'train' split a run's held-out images come from has 12 samples, "
        "fewer than the 16 a hold-out of its tail needs: data.heldout=auto holds out nothing, and every run would "
        "train to its end without the held-out loss a sweep compares; give the set a 'val' split")


def test_a_run_stopped_before_its_end_is_not_named_finished(tmp_path):
    """A stopped run writes its summary.json too (`stopped_by_signal`, its steps short of `planned_steps`: Ctrl-C,
    a time limit's SIGTERM), and `why_no_row` read any summary with a finite loss as "finished, not yet read into
    results.jsonl": the report told a run that the same `scaling run` resumes as one it only has to read."""
    from mixmae_scale.scaling.sweep_plan import why_no_row

    def folder(name: str, **summary) -> pathlib.Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"heldout_loss_end": 0.9, **summary}))
        return run_dir

    assert why_no_row(folder("signal", steps=4, planned_steps=10, stopped_by_signal="SIGTERM")) == (
        "started but not finished")
    assert why_no_row(folder("short", steps=4, planned_steps=10)) == "started but not finished"
    assert why_no_row(folder("done", steps=10, planned_steps=10)) == "finished, not yet read into results.jsonl"
    assert why_no_row(folder("nan", steps=10, planned_steps=10, heldout_loss_end=float("nan"))) == "diverged"
    assert why_no_row(tmp_path / "absent") == "not started"
