"""Running a sweep: locally, runs side by side on this machine's device (finished runs are skipped), or as cluster
commands.

Each run pretrains with its own budget as the whole schedule (warm-up 10%, cosine to the end), on a
subset of the training shards for its data fraction (`subsets`), and appends one line to `results.jsonl`: N, D,
C, the final training loss, the held-out reconstruction loss with fixed masks and seed (comparable
across runs), optionally a linear-probe top-1, and the wall time. What is already there (rows, finished folders) is
read back and judged against the plan first (`recorded`). Runs go to workers (`workers`, `in_process`):
`parallel` of them share the device, each taking the next run from one queue (`start_order`) and running up to
`per_process` runs before a fresh process takes its place; `--emit-commands` writes their lines instead (`commands`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import ConfigError
from mixmae_scale.data.errors import plural
from mixmae_scale.data.manifest import DataError
from mixmae_scale.engine import run_lock
from mixmae_scale.scaling.commands import launch_line, pretrain_args
from mixmae_scale.scaling.in_process import DeviceShare, device_share
from mixmae_scale.scaling.recorded import (
    Diverged,
    SweepError,
    append_row,
    data_read_if_here,
    finished_here,
    folder_row,
    mend_last_line,
    recorded_rows,
    refuse_other_plans,
    row_differences,
    rows_of,
)
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec, check_budgets, expand
from mixmae_scale.scaling.subsets import data_read, run_data, subset_shards, whole_sets
from mixmae_scale.scaling.sweep_plan import named, not_planned, write_plan
from mixmae_scale.scaling.workers import (
    RunQueue,
    SweepStop,
    exit_reason,
    start_order,
    worker,
)

SWEEP_LOCK = ".sweep.lock"


def _sweep_in_use(out: Path, holder: str) -> str:
    return (f"{out} is in use by another `mixmae scaling run` ({holder}); two on one --out would start the same "
            "pending runs into the same folders: wait for that one to end (or stop it), or give this one another --out")


@dataclass
class Tally:
    """What a `scaling run` did, for its last lines."""

    ran: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # a failed run's cause, as its line said it ("killed by SIGKILL")
    diverged: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # in flight when a signal stopped the sweep
    start: float = field(default_factory=time.perf_counter)

    def fail(self, run_id: str, why: str) -> None:
        self.failed.append(run_id)
        self.why[run_id] = why

    def failures(self) -> str:
        """The failed runs with their causes, for the sweep's last lines: a bare count or list of ids sent the reader
        up the log to learn that a worker was killed."""
        return ", ".join(f"{run_id}: {self.why[run_id]}" if run_id in self.why else run_id for run_id in self.failed)


def plan_record(spec: SweepSpec) -> dict:
    """What a row records of the spec beyond its run's plan: the profile and the mixture are in no override."""
    return {"sweep": spec.name, "profile": spec.profile, "sources": spec.sources}


def run_sweep(spec: SweepSpec, out: Path, emit_commands: Path | None = None, log=print, parallel: int = 1,
              per_process: int = 1) -> list[dict]:
    """Run every planned run here (`parallel` workers share the device, each running up to `per_process` runs
    without starting again), or write their launch lines. Ends with the counts, the time and the next command;
    raises SweepError, after recording every run that finished, when a run failed."""
    # Commands for a cluster can be written where the shards are not (the spec's train_samples); runs here read them.
    train_samples = spec.train_samples_for_plan(option=None)
    runs = expand(spec, train_samples)
    check_budgets(spec, runs, log)
    # Two sweeps on one --out would both start its pending runs, into the same folders: one holds it at a time.
    lock = run_lock.take(out, SWEEP_LOCK, _sweep_in_use)
    try:
        return _sweep(spec, out, runs, train_samples, emit_commands, log, parallel, per_process)
    finally:
        if lock is not None:
            lock.release()


def _sweep(spec: SweepSpec, out: Path, runs: list[PlannedRun], train_samples: int, emit_commands: Path | None, log,
           parallel: int, per_process: int) -> list[dict]:
    for results in (out / "results.jsonl", out / "lr_sweep.jsonl"):
        mend_last_line(results, log)
        refuse_other_sweeps(spec, results, rows_of(results))
    for fraction in spec.data_fractions:  # a fraction whole shards miss is refused before anything runs
        try:
            run_data(spec, fraction, out)
        except DataError as exc:  # planned where the shards are not: lines name the whole sets, refused below 1
            if emit_commands is not None:
                whole_sets(spec, fraction, train_samples, exc)
            continue
        refuse_without_heldout(spec, fraction, subset_shards(spec.shards, fraction, out / "data"))
    # The study's steps do not wait for the lr sweep's base lr: its folders are checked before the lr sweep runs.
    refuse_other_plans(spec, runs, out, {row["run_id"] for row in rows_of(out / "results.jsonl")},
                        lr_pending=bool(spec.learning_rate.sweep))
    # Before the plan is recorded: a refused spec's plan.json made `scaling report` fit the refused plan's runs.
    if spec.learning_rate.sweep and emit_commands is None:  # its rows first, as the lr sweep runs first
        refuse_stale_rows(spec, sweep_runs(spec, train_samples), out, out / "lr_sweep.jsonl", plan_record(spec))
    refuse_stale_rows(spec, runs, out, out / "results.jsonl", plan_record(spec),
                      lr_pending=bool(spec.learning_rate.sweep))
    write_plan(out, spec, runs)  # the runs `scaling fit` and `report` take: the spec's now
    dropped = not_planned(rows_of(out / "results.jsonl"), runs)
    if dropped:
        are = "is" if len(dropped) == 1 else "are"
        log(f"{plural(len(dropped), 'recorded run')} {are} not in the spec's plan now ({named(dropped)}): "
            f"`mixmae scaling fit` and `report` leave them out (their rows stay in {out / 'results.jsonl'})")
    base_lr = None
    tally = Tally()
    first: list[str] = []
    if spec.learning_rate.sweep:
        if emit_commands is not None:  # the base lr is the sweep's to find on the cluster: left unset
            first = _emit_lr_sweep(spec, train_samples, out)
        else:
            base_lr = lr_sweep(spec, train_samples, out, log, parallel, per_process, tally)
            runs = expand(spec, train_samples, base_lr)
    if emit_commands is not None:
        lines = [f"# {r.run_id}: N={r.params:,} C={r.flops:.3g} steps={r.steps}\n"
                 + launch_line(spec, r, out, train_samples) for r in runs]
        write_text(emit_commands, "".join(line + "\n" for line in [*first, *lines]))  # whole, or not at all
        if first:
            log(f"the lr sweep's {len(spec.learning_rate.sweep)} runs come first in {emit_commands}")
        log(f"wrote {plural(len(lines), 'launch command')} to {emit_commands}")
        log(f"next: run them where the GPUs are; then the same `mixmae scaling run` without --emit-commands "
            f"(--out {out}) reads their finished run folders into results.jsonl")
        return []
    share = device_share(spec, runs, parallel, per_process, os.cpu_count() or 2)
    log(f"{plural(len(runs), 'run')}: {share.describe()}")
    rule = spec.learning_rate.describe(base_lr)
    rows = _run_all(runs, spec, out, out / "results.jsonl", log, share, {"lr_rule": rule, **plan_record(spec)}, tally)
    _summary(tally, out, log)
    return rows


def refuse_other_sweeps(spec: SweepSpec, results: Path, rows: list[dict]) -> None:
    """The spec's name in every row: `scaling report` refuses rows of two sweeps joined into one file. Checked
    before the lr sweep, which would otherwise run another spec's lrs into this folder first."""
    others = sorted({str(r.get("sweep")) for r in rows} - {"None", spec.name})
    if others:
        raise SweepError(f"{results} holds runs of sweep {', '.join(others)}, not of '{spec.name}' (the spec's "
                         "name): give this spec its own --out, or its earlier name to continue that sweep")


def refuse_without_heldout(spec: SweepSpec, fraction: float, subset: Path) -> None:
    """A set under 16 images without a validation split holds out nothing under data.heldout=auto
    (data/heldout.py), and its runs measure no held-out loss, which is what a sweep compares: every run would
    train to its end and only then be refused a row. Refused here, before the first run (the lr sweep's too).
    `subset`: the folder a run of `fraction` reads (its validation split is the whole set's): data.shards, from
    which a run takes its held-out images with a mixture too (`pretrain`), while training reads the sources."""
    from mixmae_scale.config import load_config
    from mixmae_scale.data.heldout import GRID_IMAGES, choose_heldout, heldout_count

    config, _ = load_config(spec.profile, None, [*spec.overrides, f"data.shards={subset}"])
    data = config.data
    try:
        heldout = choose_heldout(str(subset), data.train_split, data.val_split, data.heldout,
                                 heldout_count(config.logging.heldout_batches, config.batch.micro))
    except DataError:
        return  # a hold-out the settings refuse: each run's start refuses it, naming the settings
    if heldout.images is not None:
        return
    run = "a run" if fraction == 1 else f"a run of data fraction {fraction:g}"
    # With sources a run trains on them: `shards` gives only the held-out images, from its subset's train split.
    which = f"{run}'s held-out images come from" if spec.sources else f"{run} reads"
    alone = " (with sources: the held-out images alone; training reads the sources)" if spec.sources else ""
    raise SweepError(f"{spec.file or 'the sweep spec'}: shards {spec.shards}{alone} have no split '{data.val_split}' "
                     f"(data.val_split), and the '{data.train_split}' split {which} has "
                     f"{plural(heldout.train_samples, 'sample')}, fewer than the {2 * GRID_IMAGES} a hold-out of its "
                     "tail needs: data.heldout=auto holds out nothing, and every run would train to its end without "
                     f"the held-out loss a sweep compares; {heldout.way_to_one}")


def _summary(tally: Tally, out: Path, log) -> None:
    minutes, seconds = divmod(round(time.perf_counter() - tally.start), 60)
    diverged = f", {len(tally.diverged)} diverged ({', '.join(tally.diverged)}: not points)" if tally.diverged else ""
    failed = f" ({tally.failures()})" if tally.failed else ""
    log(f"sweep: {tally.ran} ran, {tally.reused} reused (finished earlier), {len(tally.failed)} failed{failed}"
        f"{diverged}, in {minutes} min {seconds:02d} s; results in {out / 'results.jsonl'}")
    if tally.failed:
        raise SweepError(f"{plural(len(tally.failed), 'run')} failed ({tally.failures()}; their output is above); "
                         f"the rest are recorded: run the same `mixmae scaling run` again to retry only those")
    log(f"next: mixmae scaling report --out {out}   (fit.json, report.md and figures; `mixmae scaling fit --out "
        f"{out}` for fit.json alone)")


def lr_sweep(spec: SweepSpec, train_samples: int, out: Path, log, parallel: int, per_process: int = 1,
             tally: Tally | None = None) -> float:
    """The base lr: each of `learning_rate.sweep` at the smallest size and budget (first seed), best held-out
    loss wins; results in lr_sweep.jsonl (resumable), not in results.jsonl, so no fit sees them."""
    runs = sweep_runs(spec, train_samples)
    tally = tally if tally is not None else Tally()
    share = device_share(spec, runs, parallel, per_process, os.cpu_count() or 2)
    _run_all(runs, spec, out, out / "lr_sweep.jsonl", log, share, {"lr_rule": "lr sweep", **plan_record(spec)}, tally)
    if tally.failed:
        raise SweepError(f"the lr sweep: {plural(len(tally.failed), 'run')} failed ({tally.failures()}; output "
                         "above); run the same `mixmae scaling run` again to retry them")
    done = {r["run_id"]: r for r in rows_of(out / "lr_sweep.jsonl")}
    # A diverged lr (no row) scores worst; NaN in a comparison would have let it win.
    scored = [(done[r.run_id]["heldout_loss"] if r.run_id in done else math.inf, lr)
              for r, lr in zip(runs, spec.learning_rate.sweep, strict=True)]
    if all(loss == math.inf for loss, _ in scored):
        raise SweepError(f"every lr of the lr sweep {list(spec.learning_rate.sweep)} diverged: try smaller ones")
    _, best = min(scored)
    if best in (min(spec.learning_rate.sweep), max(spec.learning_rate.sweep)) and len(scored) > 2:
        log(f"warning: the best base lr {best:g} is at the edge of the sweep {list(spec.learning_rate.sweep)}: "
            "widen it")
    log("lr sweep: " + ", ".join(f"{lr:g} -> {loss:.4f}" for loss, lr in scored) + f"; base lr {best:g}")
    return best


def sweep_runs(spec: SweepSpec, train_samples: int) -> list[PlannedRun]:
    smallest = min(expand(dataclasses.replace(spec, seeds=spec.seeds[:1], data_fractions=[max(spec.data_fractions)],
                                              budgets=sorted(spec.budgets)[:1], steps=spec.steps[:1],
                                              epochs=spec.epochs[:1]), train_samples),
                   key=lambda r: r.params)
    size = next(s for s in spec.sizes if s["name"] == smallest.size)
    runs: list[PlannedRun] = []
    for lr in spec.learning_rate.sweep:
        one = dataclasses.replace(spec, sizes=[size], seeds=spec.seeds[:1], data_fractions=[smallest.data_fraction],
                                  budgets=sorted(spec.budgets)[:1], steps=spec.steps[:1], epochs=spec.epochs[:1])
        run = expand(one, train_samples, lr)[0]
        run = dataclasses.replace(run, run_id=f"lr{lr:g}-{run.run_id}")
        if any(r.run_id == run.run_id for r in runs):  # the id shows 6 significant digits
            raise ConfigError(f"{spec.file or 'the sweep spec'}: learning_rate.sweep values "
                              f"{list(spec.learning_rate.sweep)} give the run id {run.run_id} twice: make them "
                              "differ in their first 6 significant digits")
        runs.append(run)
    return runs


def _emit_lr_sweep(spec: SweepSpec, train_samples: int, out: Path) -> list[str]:
    """The lr sweep's lines and the note that heads them, written first in the commands file."""
    lines = ["# 1. the lr sweep: run these, take the base lr with the lowest held-out loss (summary.json), then "
             "run the lines below with --set optim.base_learning_rate=<it>"]
    lines += [launch_line(spec, r, out, train_samples) for r in sweep_runs(spec, train_samples)]
    lines.append("# 2. the study (base lr: the sweep's best)")
    return lines


def refuse_stale_rows(spec: SweepSpec, runs: list[PlannedRun], out: Path, results: Path, extra: dict,
                      lr_pending: bool = False) -> None:
    """A recorded row of another plan under a run's id is refused. `lr_pending`: the lr sweep has yet to choose the
    base lr the study's runs are planned with, so the rows' own base lr is not compared (it is once it has)."""
    done = recorded_rows(results)
    data = {fraction: data_read_if_here(spec, fraction, out).get("data_subsets")
            for fraction in {run.data_fraction for run in runs if run.run_id in done}}

    def kept(row: dict) -> dict:
        if not lr_pending or not isinstance(row.get("overrides"), list):
            return row
        return {**row, "overrides": [o for o in row["overrides"]
                                     if not str(o).startswith("optim.base_learning_rate=")]}

    stale = [f"{results}:{done[run.run_id][0]}: run {run.run_id} ({'; '.join(said)})" for run in runs
             if run.run_id in done and (said := row_differences(kept(done[run.run_id][1]), run, extra,
                                                                data[run.data_fraction]))]
    if stale:
        were = "was" if len(stale) == 1 else "were"
        raise SweepError(f"{plural(len(stale), 'recorded run')} {were} run under another plan than the spec's now, "
                         f"under the same id: {' | '.join(stale[:5])}{' | ...' if len(stale) > 5 else ''}. Their "
                         f"rows are no points of this plan: give the changed spec a new --out, or remove those rows "
                         f"from {results.name} and their folders from {out / 'runs'} to run them again")


def _run_all(runs: list[PlannedRun], spec: SweepSpec, out: Path, results: Path, log, share: DeviceShare,
             extra: dict, tally: Tally) -> list[dict]:
    """Runs not yet in `results`, by `share.parallel` workers; each finished run is appended (fsync'd) at once. A
    recorded row of another plan under a run's id is refused before any run starts."""
    done = recorded_rows(results)
    refuse_stale_rows(spec, runs, out, results, extra)
    refuse_other_plans(spec, runs, out, set(done))
    pending = []
    rows: list[dict] = []
    for index, run in enumerate(runs, start=1):
        run_dir = out / "runs" / run.run_id
        if run.run_id in done:
            tally.reused += 1
            log(f"[{index}/{len(runs)}] {run.run_id}: done earlier, skipped")
        elif finished_here(run_dir, run):  # e.g. run on a cluster from --emit-commands lines: read, not rerun
            try:
                row = {**folder_row(spec, run, run_dir, None), **data_read_if_here(spec, run.data_fraction, out),
                       **extra}
            except Diverged as exc:
                tally.diverged.append(run.run_id)
                log(f"[{index}/{len(runs)}] {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - one unreadable run is recorded as failed; the rest go on
                tally.fail(run.run_id, "its finished folder cannot be read")
                log(f"[{index}/{len(runs)}] {run.run_id}: finished run in {run_dir} cannot be read: {exc}")
                continue
            append_row(results, row)
            rows.append(row)
            tally.reused += 1
            log(f"[{index}/{len(runs)}] {run.run_id}: finished run read from {run_dir}")
        else:
            pending.append((index, run))
    for fraction in {run.data_fraction for _, run in pending}:  # made once, before runs start side by side
        run_data(spec, fraction, out)
    lock = threading.Lock()

    def finished(index: int, run: PlannedRun, code: int, wall_s: float, output: str) -> None:
        with lock:
            if stop.signal is not None and (code or not finished_here(out / "runs" / run.run_id, run)):
                tally.stopped.append(run.run_id)
                log(f"[{index}/{len(runs)}] {run.run_id}: stopped by {stop.name} before its end")
                return
            why = ""
            if not code:
                try:
                    row = {**folder_row(spec, run, out / "runs" / run.run_id, wall_s,
                                  subset_shards(spec.shards, run.data_fraction, out / "data")),
                           **data_read(spec, run.data_fraction, out), **extra}
                except Diverged as exc:
                    tally.diverged.append(run.run_id)
                    log(f"[{index}/{len(runs)}] {exc}")
                    return
                except Exception as exc:  # noqa: BLE001 - one unreadable run is recorded as failed; the rest go on
                    # Its process ended well: "exit 1" would have named a status no process had.
                    why = "its run folder cannot be read"
                    output = f"{output}\nmixmae: error: reading run {run.run_id}: {exc}\n"
            if code or why:
                why = why or exit_reason(code)
                tally.fail(run.run_id, why)
                log(f"[{index}/{len(runs)}] {run.run_id}: failed ({why}):\n{output[-2000:]}")
                return
            append_row(results, row)
            rows.append(row)
            tally.ran += 1
            log(f"[{index}/{len(runs)}] {run.run_id}: N={run.params / 1e6:.3f}M C={run.flops:.3g} steps={run.steps} "
                f"held-out loss {row['heldout_loss']:.4f} ({wall_s:.0f} s)")

    queue = RunQueue(sorted(pending, key=lambda item: start_order(item[1])))
    stop = SweepStop(queue)

    def job_args(run: PlannedRun) -> list[str]:
        return pretrain_args(spec, run, out, share.threads)

    with stop.installed(), ThreadPoolExecutor(share.parallel) as pool:
        futures = [pool.submit(worker, queue, share, job_args, finished, stop=stop) for _ in range(share.parallel)]
        # Waited for in short spells: a signal the kernel gives a worker's thread runs its handler here, in the main
        # thread, at the next bytecode, and a wait without a timeout gave it none until every run had ended.
        while wait(futures, timeout=0.2).not_done:
            pass
        for future in futures:
            future.result()
    if stop.signal is not None:
        _stopped(stop, tally, queue.left(), results, out)
    return rows


def _stopped(stop: SweepStop, tally: Tally, not_started: int, results: Path, out: Path) -> None:
    minutes, seconds = divmod(round(time.perf_counter() - tally.start), 60)
    stopped = f" ({', '.join(tally.stopped)})" if tally.stopped else ""
    failed = f", {len(tally.failed)} failed ({tally.failures()})" if tally.failed else ""
    raise SweepError(f"sweep stopped by {stop.name}: {tally.ran} ran, {tally.reused} reused (finished earlier), "
                     f"{len(tally.stopped)} stopped before their end{stopped}{failed}, {not_started} not started, in "
                     f"{minutes} min {seconds:02d} s; finished runs are in {results}. The same `mixmae scaling run "
                     f"... --out {out}` resumes: a stopped run from the checkpoint it saved, the rest from the start")
