"""`mixmae scaling run --dry-run`: what the same command without it would do in OUT, and for how long, before any
device time is spent on it. Nothing is trained or written.

Every planned run is listed with what the sweep would do with it: nothing (its row is in results.jsonl), read its
finished folder, resume it (a stopped run's summary names the step it saved at) or run it. A finished folder the
sweep would not read as a point is listed as what the sweep does with it instead, by its rule (`recorded.diverged`):
diverged (no row, not run again) or, without a held-out loss, failing; it was listed as read. The time of what is
left is estimated only from a measurement: for each run, the recorded run of the same size (name, N and global batch)
whose steps are nearest to its own, its wall time per step (of a resumed run, its last launch's steps: its folder's
run.json) (start-up and held-out evaluation included, so short runs overstate the time per step of long ones) times
the steps left; of several such runs, the fastest per step (a worker's first run carries its process's start-up,
tens of seconds, and runs beside other work are slower: a sweep of 6 tiny runs here recorded 95 s and 21 s for two
seeds of one size and steps). A run whose size has no recorded run has no estimate, and the total says how many runs
it covers. A second line gives the H100 cost model the sweep orders its runs by (`workers.estimated_seconds`),
labelled with what it was measured on: a GPU study's plan before any run of it exists (docs/scaling-example/gpu-iso-
flop/README.md derives its device time from it).

A recorded row of another plan under its run's id (a changed `set:`, a size's model, the profile) is listed as
refused, as `scaling run` refuses it, but judged without its data: the data subsets it is compared on are written
under OUT/data by the run. The checks of run folders' config.yaml against the plan need them too, and are not made
here: the command itself makes them before it trains.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path

from mixmae_scale.data.errors import plural
from mixmae_scale.scaling.recorded import diverged, finished_here, mended_last_line, numbered_rows, row_differences
from mixmae_scale.scaling.run import plan_record, refuse_other_sweeps, sweep_runs
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec, check_budgets, expand
from mixmae_scale.scaling.workers import FLOP_RATE, STEP_OVERHEAD_S, estimated_seconds, start_order

H100_SOURCE = (f"the H100 cost model of scaling/workers.py ({STEP_OVERHEAD_S} s per step + FLOPs at {FLOP_RATE:.2g} "
               "FLOP/s, measured on Swin-B at batch 64: benchmarks/results/gpu_fast_step/loop_overhead.json; not "
               "measured on these models)")


REFUSED = "REFUSED by `scaling run`"
DIVERGED = "diverged in its folder"
FAILING = "FAILS in `scaling run`"


def row_judge(spec: SweepSpec, lr_pending: bool):
    """`recorded.row_differences` as `scaling run` applies it, less the data: a row's subsets are taken as the plan's
    (they are made under OUT/data, which a dry run does not write), so another set at the same path goes unseen here.
    `lr_pending`: the base lr is the lr sweep's to choose, and a row's own is not compared."""
    def judge(row: dict, run: PlannedRun) -> list[str]:
        if lr_pending and isinstance(row.get("overrides"), list):
            row = {**row, "overrides": [o for o in row["overrides"]
                                        if not str(o).startswith("optim.base_learning_rate=")]}
        return row_differences(row, run, plan_record(spec), row.get("data_subsets"))
    return judge


@dataclass(frozen=True)
class Step:
    """One planned run and what the sweep would do with it."""

    run: PlannedRun
    state: str
    steps_left: int
    seconds: float | None = None  # estimated from a recorded run of its size
    measured_by: str | None = None  # that run's id


def _rows(path: Path, log) -> list[dict]:
    """The rows as `scaling run` would read them, its mend of a cut last line made in memory and said."""
    if not path.exists():
        return []
    data, cut = mended_last_line(path.read_bytes())
    if cut:
        log(f"{path}: its last line is cut short ({cut} bytes without a newline): `scaling run` removes it, and "
            "that run is read again from its folder, or run again")
    return [row for _, row in numbered_rows(path, data.decode())]


def _timed_steps(row: dict, out: Path) -> object:
    """The steps a row's `wall_s` timed: a resumed run's row times its last launch alone (a run stopped at step 70 of
    80 and resumed recorded 10 steps' time), which its folder's run.json gives (`launches`); without the folder,
    its steps."""
    try:
        last = json.loads((out / "runs" / str(row.get("run_id")) / "run.json").read_text())["launches"][-1]
        return last["end_step"] - last["start_step"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return row.get("steps")


def _measured(rows: list[dict], out: Path) -> dict[tuple, list[tuple[int, float, str]]]:
    """(steps, wall s, run id) of the recorded runs, by their size: name, N and global batch."""
    by_size: dict[tuple, list[tuple[int, float, str]]] = {}
    for row in rows:
        steps, wall = _timed_steps(row, out), row.get("wall_s")
        if (isinstance(steps, int) and steps > 0 and isinstance(wall, (int, float)) and math.isfinite(wall)
                and wall > 0):
            key = (row.get("size"), row.get("params"), row.get("global_batch"))
            by_size.setdefault(key, []).append((steps, float(wall), str(row.get("run_id"))))
    return by_size


def _state(run: PlannedRun, run_dir: Path, recorded: dict[str, dict], judge) -> tuple[str, int]:
    if run.run_id in recorded:
        said = judge(recorded[run.run_id], run)
        if said:
            return f"{REFUSED}, recorded under another plan ({'; '.join(said)})", 0
        return "recorded: skipped", 0
    summary = run_dir / "summary.json"
    try:
        if finished_here(run_dir, run):
            end = json.loads(summary.read_text()).get("heldout_loss_end")
            if diverged(end):
                return (f"{DIVERGED} (held-out loss {end!r} at its end): not a point, no row; `scaling run` says so "
                        f"and it is not run again (remove {run_dir} to run it again)"), 0
            if end is None:
                return (f"{FAILING}: finished in its folder without a held-out loss, no row (a sweep compares "
                        "held-out losses: the shards need a validation split)"), 0
            return "finished in its folder: read, not run", 0
        stopped_at = json.loads(summary.read_text()).get("steps") if summary.exists() else None
    except (OSError, ValueError):
        return "its folder's summary.json cannot be read: `scaling run` says why", run.steps
    if isinstance(stopped_at, int) and 0 < stopped_at < run.steps:
        return f"stopped at step {stopped_at}: resumes from its checkpoint", run.steps - stopped_at
    if (run_dir / "config.yaml").exists():
        return "started, not finished (no summary): runs again from its last checkpoint, if any", run.steps
    return "to run", run.steps


def plan_steps(runs: list[PlannedRun], out: Path, rows: list[dict], measured_rows: list[dict],
               judge=lambda row, run: []) -> list[Step]:
    """What the sweep would do with each of `runs`, recorded in `rows`, each estimated from `measured_rows`.
    `judge(row, run)`: how a recorded row differs from the plan's run of its id (none: it is this plan's)."""
    recorded = {str(row.get("run_id")): row for row in rows}
    measured = _measured(measured_rows, out)
    steps = []
    for run in runs:
        state, left = _state(run, out / "runs" / run.run_id, recorded, judge)
        seconds = by = None
        same_size = measured.get((run.size, run.params, run.global_batch))
        if left and same_size:
            nearest = min(abs(math.log(m[0] / run.steps)) for m in same_size)
            done_steps, wall, by = min((m for m in same_size if abs(math.log(m[0] / run.steps)) == nearest),
                                       key=lambda m: (m[1] / m[0], m[2]))
            seconds = wall / done_steps * left
        steps.append(Step(run, state, left, seconds, by))
    return steps


def finish_time(costs: list[tuple[tuple, float]], parallel: int) -> float:
    """When the last of the runs ends with `parallel` workers taking them in the sweep's order, each run costing
    what it is estimated to (costs: (its start_order key, seconds))."""
    free = [0.0] * max(parallel, 1)
    for _, seconds in sorted(costs, key=lambda c: c[0]):
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def _minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


def _table(title: str, steps: list[Step], log) -> None:
    log(title)
    log(f"  {'run':<30}{'N':>12}{'steps':>8}{'left':>8}{'est. s':>9}  what the sweep does")
    for step in steps:
        est = f"{step.seconds:.0f}" if step.seconds is not None else "-"
        log(f"  {step.run.run_id:<30}{step.run.params:>12,}{step.run.steps:>8}{step.steps_left:>8}{est:>9}  "
            f"{step.state}")


def _estimate(steps: list[Step], parallel: int, log) -> None:
    pending = [s for s in steps if s.steps_left]
    if not pending:
        log("estimate: nothing left to run")
        return
    known = [s for s in pending if s.seconds is not None]
    if not known:
        log(f"estimate from runs measured here: none ({plural(len(pending), 'run')} left, and no run of their sizes "
            "is recorded in this folder, so there is no measured time per step to estimate from)")
    else:
        total = sum(s.seconds for s in known)
        cover = ("every run left" if len(known) == len(pending) else
                 f"{len(known)} of the {len(pending)} runs left; the other {len(pending) - len(known)} have no "
                 f"recorded run of their size ({', '.join(sorted({s.run.size for s in pending if s.seconds is None}))}"
                 "), so it is a lower bound")
        line = f"estimate from runs measured here: {_minutes(total)} of runs for {cover}"
        if len(known) == len(pending) and parallel > 1:
            end = finish_time([(start_order(s.run), s.seconds) for s in known], parallel)
            line += f"; with --parallel {parallel}, the last run ends after about {_minutes(end)}"
        log(line + ". Source: wall_s / steps in results.jsonl of each run's recorded run of its size (name, N, "
            "global batch) nearest in steps, the fastest of those (its start-up included; timed where, and with the "
            "--parallel, those runs ran); a worker's process start is not included")
    model = [(start_order(s.run), estimated_seconds(s.run) * s.steps_left / s.run.steps) for s in pending]
    end = finish_time(model, parallel)
    log(f"estimate on an H100: {_minutes(sum(c for _, c in model))} of runs, the last ending after about "
        f"{_minutes(end)} with --parallel {parallel} (each worker's process start not included). Source: "
        f"{H100_SOURCE}")


def dry_run(spec: SweepSpec, out: Path, parallel: int = 1, log=print) -> list[Step]:
    """Lists what `scaling run` of `spec` into `out` would do with each run, and its estimated time; trains and
    writes nothing. Refuses what the sweep refuses before reading any folder: runs off their budgets, rows of another
    sweep."""
    train_samples = spec.train_samples_for_plan(option=None)
    runs = expand(spec, train_samples)
    check_budgets(spec, runs, log)
    results, lr_results = out / "results.jsonl", out / "lr_sweep.jsonl"
    rows, lr_rows = _rows(results, log), _rows(lr_results, log)
    refuse_other_sweeps(spec, results, rows)
    refuse_other_sweeps(spec, lr_results, lr_rows)
    lock = out / ".sweep.lock"
    if lock.exists() and lock.stat().st_size:
        log(f"note: {lock} exists: if a `scaling run` holds this folder now, what is listed as left may be under way")
    measured = [*rows, *lr_rows]
    steps: list[Step] = []
    if spec.learning_rate.sweep:
        lr_steps = plan_steps(sweep_runs(spec, train_samples), out, lr_rows, measured, row_judge(spec, False))
        _table(f"the lr sweep first ({plural(len(lr_steps), 'run')}, rows in {lr_results}):", lr_steps, log)
        steps += lr_steps
    study = plan_steps(runs, out, rows, measured, row_judge(spec, bool(spec.learning_rate.sweep)))
    _table(f"the study ({plural(len(study), 'run')}, rows in {results}):", study, log)
    steps += study
    left = [s for s in steps if s.steps_left]
    recorded, read, lost, failing = (sum(s.state.startswith(state) for s in steps)
                                     for state in ("recorded", "finished", DIVERGED, FAILING))
    refused = [s.run.run_id for s in steps if s.state.startswith(REFUSED)]
    flops = sum(s.run.flops * s.steps_left / s.run.steps for s in left)
    lost_said = f", {lost} diverged: no rows" if lost else ""
    failing_said = f", {failing} failing" if failing else ""
    log(f"{plural(len(steps), 'run')}: {recorded + read + lost} done ({recorded} recorded, {read} finished in their "
        f"folders{lost_said}){failing_said}, {len(refused)} refused, {len(left)} left "
        f"({sum(s.steps_left for s in left):,} steps, "
        f"{flops:.3g} training FLOPs)")
    if refused:
        log(f"`scaling run` refuses this spec here before any run starts: {plural(len(refused), 'recorded run')} "
            f"of another plan under the same id ({', '.join(refused[:10])}{', ...' if len(refused) > 10 else ''}): "
            f"give the changed spec a new --out, or remove those rows from {results.name} (or {lr_results.name}) "
            f"and their folders from {out / 'runs'} to run them again")
    _estimate(steps, parallel, log)
    log("dry run: nothing trained or written; the same command without --dry-run runs it")
    return steps
