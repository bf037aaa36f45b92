"""Running a sweep: locally one run after another (finished runs are skipped), or as cluster commands.

Each run pretrains with its own budget as the whole schedule (warm-up 10%, cosine to the end), on a
subset of the training shards for its data fraction, and appends one line to `results.jsonl`: N, D,
C, the final training loss, the held-out reconstruction loss with fixed masks and seed (comparable
across runs), optionally a linear-probe top-1, and the wall time. Runs go to workers (`in_process`):
`parallel` of them share the device, each taking the next run from one queue (`start_order`) and running up to
`per_process` runs before a fresh process takes its place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import ConfigError
from mixmae_scale.data.heldout import same_location
from mixmae_scale.data.manifest import DataError, load_split
from mixmae_scale.engine import run_lock
from mixmae_scale.engine.run_record import point_provenance, read_record
from mixmae_scale.scaling.in_process import MARKER, DeviceShare, device_share
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec, check_budgets, expand
from mixmae_scale.scaling.sweep_plan import named, not_planned, write_plan


class SweepError(RuntimeError):
    """Runs of the sweep failed; the others were recorded and a rerun retries only the failed ones."""


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
    diverged: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # in flight when a signal stopped the sweep
    start: float = field(default_factory=time.perf_counter)


class Diverged(RuntimeError):
    """A run that ended with a non-finite held-out loss: an outcome (its lr is too high for its size), not a point,
    and not a failure to retry: running it again gives the same."""


def subset_shards(shards: str | Path, fraction: float, out: Path, split: str | None = None) -> Path:
    """A folder whose manifest lists the first ceil(fraction x n) training shards and every validation shard,
    pointing into the full set wherever it lives (a folder, adopted shards, s3://): nothing is copied or linked,
    and data fractions are nested, so larger ones see a superset. Whole shards are rarely the fraction asked for:
    `run_data` refuses one too far off and rows record what was read."""
    from mixmae_scale.data import storage
    from mixmae_scale.data.manifest import load_manifest, read_manifest, write_manifest

    replace = dataclasses.replace
    location = str(shards) if storage.is_remote(shards) else str(Path(shards).resolve())
    # Keyed on the set (where, which split, its manifest as written): a `fraction-x/` made for other shards or
    # sources, or for this folder before it was converted again, pointed every later run at the old set.
    source = json.dumps([location, split or "train", read_manifest(location)], sort_keys=True)
    folder = out / f"fraction-{fraction:g}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    if (folder / "dataset.json").exists():
        return folder
    manifest = load_manifest(location)
    base = storage.join(location, manifest.base or "")
    splits = {name: replace(entry, shards=tuple(replace(s, name=storage.join(base, s.name),
                                                        index=storage.join(location, s.index)) for s in entry.shards))
              for name, entry in manifest.splits.items()}
    train = splits[split or "train"]  # a mixture's source may train on another split: it becomes train
    # 0.6 x 5 is 3.0000000000000004 in floating point: its ceil, 4 shards, was 0.8 of the set
    keep = train.shards[: max(1, math.ceil(fraction * len(train.shards) - 1e-9))]
    splits["train"] = replace(train, shards=keep, samples=sum(s.samples for s in keep))
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "classes.json", json.dumps(manifest.classes, indent=1))
    write_manifest(folder, replace(manifest, splits=splits, base=location))
    return folder


FRACTION_TOLERANCE = 0.1  # whole shards may read this much more (or less) of a set than its data fraction


def run_data(spec: SweepSpec, fraction: float, out: Path) -> tuple[list[str], int]:
    """The overrides that point a run at its data fraction (of the one set, or of every set of a mixture) and the
    samples per epoch they give (a mixture: each set's subset times its weight)."""
    sets, samples, _ = _fraction_sets(spec, fraction, out)
    return sets, samples


def data_read(spec: SweepSpec, fraction: float, out: Path) -> dict:
    """What a row records of the data its run read: the share of the training samples its whole shards hold (of the
    weighted mixture) and their count per epoch. The fraction asked for is `data_fraction`: with 4 shards, 0.1 read
    0.25 of the set and was recorded as 0.1."""
    _, samples, share = _fraction_sets(spec, fraction, out)
    return {"data_fraction_read": round(share, 6), "train_samples_read": samples}


def _fraction_sets(spec: SweepSpec, fraction: float, out: Path) -> tuple[list[str], int, float]:
    """(overrides, samples per epoch, share of the training samples read). With a mixture, `shards` gives only the
    held-out images: its subset is not checked against the fraction."""
    subset = subset_shards(spec.shards, fraction, out / "data")
    if not spec.sources:
        kept, full = _whole_shards(spec, spec.shards, None, subset, fraction)
        return [f"data.shards={subset}"], kept, kept / full
    mixture, samples, total = [], 0.0, 0.0
    for number, source in enumerate(spec.sources):
        part = subset_shards(source["shards"], fraction, out / "data" / f"source{number}", source.get("split"))
        kept, full = _whole_shards(spec, source["shards"], source.get("split"), part, fraction)
        mixture.append({"shards": str(part), "weight": source["weight"], "split": "train"})
        samples, total = samples + source["weight"] * kept, total + source["weight"] * full
    return [f"data.shards={subset}", f"data.sources={json.dumps(mixture)}"], max(1, round(samples)), samples / total


def _whole_shards(spec: SweepSpec, shards: str, split: str | None, part: Path, fraction: float) -> tuple[int, int]:
    """(samples of the subset, samples of the set); refused when the subset is more than FRACTION_TOLERANCE off."""
    full, kept = load_split(shards, split or "train"), load_split(part, "train")
    share = kept.samples / full.samples
    if abs(share / fraction - 1) <= FRACTION_TOLERANCE:
        return kept.samples, full.samples
    shares = list(itertools.accumulate(full.samples_per_shard))
    near = sorted(range(len(shares)), key=lambda k: abs(shares[k] / full.samples - fraction))[:3]
    options = ", ".join(f"{shares[k] / full.samples:.3g} ({k + 1} shard(s))" for k in sorted(near))
    raise ConfigError(f"{spec.file or 'the sweep spec'}: data_fractions {fraction:g} of {shards} ('{split or 'train'}':"
                      f" {len(shares)} shards, {full.samples} samples) is {len(kept.names)} whole shard(s), "
                      f"{kept.samples} samples: {share:.3g} of the set, {share / fraction:.2f}x the fraction (more "
                      f"than {FRACTION_TOLERANCE:.0%} off). Whole shards give {options}: give one of those")


def whole_sets(spec: SweepSpec, fraction: float, train_samples: int,
               unread: DataError | None = None) -> tuple[list[str], int]:
    """`run_data` where the sets' manifests cannot be read (lines emitted for a cluster's shards): the data overrides
    and samples per epoch a run here would get. At fraction 1 its subsets hold every training shard of each set, so
    the sets themselves stand for them (a mixture with its weights and splits) and `train_samples` (the split's
    count, a mixture's weighted one) for their samples. A smaller fraction's whole shards and their samples are in
    the manifests alone: the lines named the whole set with 'fraction x train_samples' for an epoch, and a 0.6 run
    trained on all of it, so that is refused, naming what is missing."""
    if fraction != 1.0:
        manifests = ", ".join(dict.fromkeys(_manifest_path(s) for s in [spec.shards, *(s["shards"] for s in
                                                                                      spec.sources)]))
        raise ConfigError(f"{spec.file or 'the sweep spec'}: data_fractions {fraction:g}: a run reads the first whole "
                          f"shards of each training set for it, and which those are and how many samples they hold "
                          f"(its epochs) is in the manifest ({manifests}), which cannot be read here ({unread}). Write "
                          "the commands where the manifests can be read (the images are not read), or plan "
                          "data_fractions: [1.0] here and the other fractions where they can be read")
    data = [f"data.shards={spec.shards}"]
    if spec.sources:  # as `_fraction_sets` gives them: each set's own split, read as its training split
        data.append("data.sources=" + json.dumps([{"shards": s["shards"], "weight": s["weight"],
                                                   "split": s.get("split") or "train"} for s in spec.sources]))
    return data, train_samples


def _manifest_path(location: str) -> str:
    from mixmae_scale.data import storage
    from mixmae_scale.data.manifest import MANIFEST

    return storage.join(location, MANIFEST)


def run_overrides(run: PlannedRun, data: list[str], steps_per_epoch: int, sweep: str | None = None) -> list[str]:
    """The run's budget is its whole schedule: warm-up 10%, cosine to the last step. With W&B on, the sweep's runs
    form one group named after it."""
    epochs = run.steps / steps_per_epoch
    replaced = {item.split("=", 1)[0] for item in data}
    return [*(o for o in run.overrides if o.split("=", 1)[0] not in replaced), *data, f"schedule.epochs={epochs!r}",
            f"schedule.warmup_epochs={0.1 * epochs!r}", "checkpoint.every_steps=1000000",
            "logging.visualize_every_steps=0", "logging.tensorboard=false", f"run.name={run.run_id}",
            *([f"logging.wandb.group={sweep}"] if sweep else [])]


def _recorded(results: Path) -> dict[str, tuple[int, dict]]:
    """Each recorded run's (line, row), by run id."""
    return {row["run_id"]: (number, row) for number, row in _numbered_rows(results)}


def plan_record(spec: SweepSpec) -> dict:
    """What a row records of the spec beyond its run's plan: the profile and the mixture are in no override."""
    return {"sweep": spec.name, "profile": spec.profile, "sources": spec.sources}


def _differences(row: dict, run: PlannedRun, record: dict) -> list[str]:
    """How a recorded row's run differs from the planned run of its id. A run id names size, budget (or steps) and
    seed only: a changed size's model, `set:` (batch, precision), profile, mixture or lr rule keeps it, and the old
    row passed for the new plan's point. Keys a row written before does not have are not compared."""
    planned = {"size": run.size, "seed": run.seed, "data_fraction": run.data_fraction, "budget": run.budget,
               "params": run.params, "global_batch": run.global_batch, "steps": run.steps,
               "overrides": list(run.overrides), "profile": record["profile"], "sources": record["sources"]}
    said = []
    for key, value in planned.items():
        if key not in row:
            continue
        kept = row.get("planned_steps", row["steps"]) if key == "steps" else row[key]  # steps: the planned ones
        if kept == value:
            continue
        if key == "overrides":
            only_kept, only_planned = [o for o in kept if o not in value], [o for o in value if o not in kept]
            said.append(f"overrides: {', '.join(only_kept) or '-'} recorded, {', '.join(only_planned) or '-'} planned"
                        if only_kept or only_planned else "overrides: the same ones in another order")
        else:
            said.append(f"{key}: {kept!r} recorded, {value!r} planned")
    return said


def _append(results: Path, row: dict) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


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
        _mend_last_line(results, log)
        # The spec's name in every row: `scaling report` refuses rows of two sweeps joined into one file. Checked
        # before the lr sweep, which would otherwise run another spec's lrs into this folder first.
        others = sorted({str(r.get("sweep")) for r in _rows(results)} - {"None", spec.name})
        if others:
            raise SweepError(f"{results} holds runs of sweep {', '.join(others)}, not of '{spec.name}' (the spec's "
                             "name): give this spec its own --out, or its earlier name to continue that sweep")
    for fraction in spec.data_fractions:  # a fraction whole shards miss is refused before anything runs
        try:
            run_data(spec, fraction, out)
        except DataError as exc:  # planned where the shards are not: lines name the whole sets, refused below 1
            if emit_commands is not None:
                whole_sets(spec, fraction, train_samples, exc)
    # The study's steps do not wait for the lr sweep's base lr: its folders are checked before the lr sweep runs.
    _refuse_other_plans(spec, runs, out, {row["run_id"] for row in _rows(out / "results.jsonl")},
                        lr_pending=bool(spec.learning_rate.sweep))
    write_plan(out, spec, runs)  # the runs `scaling fit` and `report` take: the spec's now
    dropped = not_planned(_rows(out / "results.jsonl"), runs)
    if dropped:
        log(f"{len(dropped)} recorded run(s) are not in the spec's plan now ({named(dropped)}): `mixmae scaling fit` "
            f"and `report` leave them out (their rows stay in {out / 'results.jsonl'})")
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
        log(f"wrote {len(lines)} launch command(s) to {emit_commands}")
        log(f"next: run them where the GPUs are; then the same `mixmae scaling run` without --emit-commands "
            f"(--out {out}) reads their finished run folders into results.jsonl")
        return []
    share = device_share(spec, runs, parallel, per_process, os.cpu_count() or 2)
    log(f"{len(runs)} run(s): {share.describe()}")
    rule = spec.learning_rate.describe(base_lr)
    rows = _run_all(runs, spec, out, out / "results.jsonl", log, share, {"lr_rule": rule, **plan_record(spec)}, tally)
    _summary(tally, out, log)
    return rows


def _summary(tally: Tally, out: Path, log) -> None:
    minutes, seconds = divmod(round(time.perf_counter() - tally.start), 60)
    diverged = f", {len(tally.diverged)} diverged ({', '.join(tally.diverged)}: not points)" if tally.diverged else ""
    log(f"sweep: {tally.ran} ran, {tally.reused} reused (finished earlier), {len(tally.failed)} failed{diverged}, in "
        f"{minutes} min {seconds:02d} s; results in {out / 'results.jsonl'}")
    if tally.failed:
        raise SweepError(f"{len(tally.failed)} run(s) failed ({', '.join(tally.failed)}; their output is above); "
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
        raise SweepError(f"the lr sweep's run(s) {', '.join(tally.failed)} failed (output above); run the same "
                         "`mixmae scaling run` again to retry them")
    done = {r["run_id"]: r for r in _rows(out / "lr_sweep.jsonl")}
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


def cluster_shape(global_batch: int, gpus_per_node: int, max_nodes: int) -> tuple[int, int]:
    """(nodes, GPUs per node): the widest data parallelism the run's global batch allows (an even micro-batch
    per GPU, whole nodes where the batch fills them), so that a run is as short as its batch permits."""
    for nodes in range(max_nodes, 0, -1):
        if global_batch % (2 * nodes * gpus_per_node) == 0:
            return nodes, gpus_per_node
    for gpus in range(gpus_per_node, 0, -1):
        if global_batch % (2 * gpus) == 0:
            return 1, gpus
    return 1, 1


def launch_line(spec: SweepSpec, run: PlannedRun, out: Path, train_samples: int) -> str:
    nodes, gpus = cluster_shape(run.global_batch, spec.cluster["gpus_per_node"], spec.cluster["max_nodes"])
    if nodes > 1 and not spec.cluster.get("file"):
        raise ConfigError(f"{run.run_id} spreads its global batch of {run.global_batch} over {nodes} nodes, and "
                          "`mixmae launch` needs a cluster file (hostfile or Slurm, as for its --cluster) for more "
                          "than one: give it in the sweep spec as cluster: {file: cluster.yaml}, or keep every run "
                          "on one node with cluster: {max_nodes: 1}")
    try:
        data, samples = run_data(spec, run.data_fraction, out)
    except DataError as exc:  # planned where the manifests are not (the spec's train_samples)
        data, samples = whole_sets(spec, run.data_fraction, train_samples, exc)
    schedule = run_overrides(run, data, max(1, samples // run.global_batch), spec.name)
    sets = [*schedule, f"cluster.num_nodes={nodes}", f"cluster.gpus_per_node={gpus}",
            f"run.output_dir={out / 'runs'}"]
    cluster = ["--cluster", spec.cluster["file"]] if spec.cluster.get("file") else []
    return "mixmae launch " + shlex.join([spec.profile, *cluster, *[a for item in sets for a in ("--set", item)]])


def _rows(path: Path) -> list[dict]:
    return [row for _, row in _numbered_rows(path)]


def _numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """The rows of results.jsonl (or lr_sweep.jsonl) with their line numbers, each line one finished run's; a line
    that is not one is refused naming path:line (a bare JSON error named no file)."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            row, problem = None, f"not JSON ({exc})"
        else:
            problem = "not a run's row (a JSON object with a run_id)"
        if not isinstance(row, dict) or "run_id" not in row:
            raise SweepError(f"{path}:{number}: {problem}; each line is one finished run's row: mend or remove that "
                             "line (a removed run's finished folder is read again, or the run is run again)")
        rows.append((number, row))
    return rows


def _mend_last_line(path: Path, log) -> None:
    """A sweep killed while appending leaves a last line without its newline; the next append would glue a row onto
    it and every later `scaling run` would fail on that line. Whole, it gets its newline; cut short, it goes (said):
    its run's folder is read again, or the run is run again. Rewritten whole (atomic), never in place."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[cut:]), dict)
    except ValueError:
        whole = False
    if whole:
        write_text(path, data.decode() + "\n")
        return
    write_text(path, data[:cut].decode())
    log(f"{path}: its last line was cut short ({len(data) - cut} bytes without a newline: a write interrupted); "
        "removed: that run is read again from its folder, or run again")


def _run_all(runs: list[PlannedRun], spec: SweepSpec, out: Path, results: Path, log, share: DeviceShare,
             extra: dict, tally: Tally) -> list[dict]:
    """Runs not yet in `results`, by `share.parallel` workers; each finished run is appended (fsync'd) at once. A
    recorded row of another plan under a run's id is refused before any run starts."""
    done = _recorded(results)
    stale = [f"{results}:{done[run.run_id][0]}: run {run.run_id} ({'; '.join(said)})" for run in runs
             if run.run_id in done and (said := _differences(done[run.run_id][1], run, extra))]
    if stale:
        raise SweepError(f"{len(stale)} recorded run(s) were run under another plan than the spec's now, under the "
                         f"same id: {' | '.join(stale[:5])}{' | ...' if len(stale) > 5 else ''}. Their rows are no "
                         f"points of this plan: give the changed spec a new --out, or remove those rows from "
                         f"{results.name} and their folders from {out / 'runs'} to run them again")
    _refuse_other_plans(spec, runs, out, set(done))
    pending = []
    rows: list[dict] = []
    for index, run in enumerate(runs, start=1):
        run_dir = out / "runs" / run.run_id
        if run.run_id in done:
            tally.reused += 1
            log(f"[{index}/{len(runs)}] {run.run_id}: done earlier, skipped")
        elif _complete(run_dir, run):  # e.g. run on a cluster from --emit-commands lines: read, not rerun
            try:
                row = {**_row(spec, run, run_dir, None), **_data_read_if_here(spec, run, out), **extra}
            except Diverged as exc:
                tally.diverged.append(run.run_id)
                log(f"[{index}/{len(runs)}] {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - one unreadable run is recorded as failed; the rest go on
                tally.failed.append(run.run_id)
                log(f"[{index}/{len(runs)}] {run.run_id}: finished run in {run_dir} cannot be read: {exc}")
                continue
            _append(results, row)
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
            if stop.signal is not None and (code or not _complete(out / "runs" / run.run_id, run)):
                tally.stopped.append(run.run_id)
                log(f"[{index}/{len(runs)}] {run.run_id}: stopped by {stop.name} before its end")
                return
            if not code:
                try:
                    row = {**_row(spec, run, out / "runs" / run.run_id, wall_s,
                                  subset_shards(spec.shards, run.data_fraction, out / "data")),
                           **data_read(spec, run.data_fraction, out), **extra}
                except Diverged as exc:
                    tally.diverged.append(run.run_id)
                    log(f"[{index}/{len(runs)}] {exc}")
                    return
                except Exception as exc:  # noqa: BLE001 - one unreadable run is recorded as failed; the rest go on
                    code, output = 1, f"{output}\nmixmae: error: reading run {run.run_id}: {exc}\n"
            if code:
                tally.failed.append(run.run_id)
                log(f"[{index}/{len(runs)}] {run.run_id}: failed (exit {code}):\n{output[-2000:]}")
                return
            _append(results, row)
            rows.append(row)
            tally.ran += 1
            log(f"[{index}/{len(runs)}] {run.run_id}: N={run.params / 1e6:.3f}M C={run.flops:.3g} steps={run.steps} "
                f"held-out loss {row['heldout_loss']:.4f} ({wall_s:.0f} s)")

    queue = RunQueue(sorted(pending, key=lambda item: start_order(item[1])))
    stop = SweepStop(queue)

    def job_args(run: PlannedRun) -> list[str]:
        return _pretrain_args(spec, run, out, share.threads)

    with stop.installed(), ThreadPoolExecutor(share.parallel) as pool:
        futures = [pool.submit(_worker, queue, share, job_args, finished, stop=stop) for _ in range(share.parallel)]
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
    failed = f", {len(tally.failed)} failed ({', '.join(tally.failed)})" if tally.failed else ""
    raise SweepError(f"sweep stopped by {stop.name}: {tally.ran} ran, {tally.reused} reused (finished earlier), "
                     f"{len(tally.stopped)} stopped before their end{stopped}{failed}, {not_started} not started, in "
                     f"{minutes} min {seconds:02d} s; finished runs are in {results}. The same `mixmae scaling run "
                     f"... --out {out}` resumes: a stopped run from the checkpoint it saved, the rest from the start")


# What a run costs on one GPU, for the order runs start in: a fixed cost per optimizer step plus its FLOPs at the rate
# the real loop reached on Swin-B, both from the H100 run in benchmarks/results/gpu_fast_step/loop_overhead.json
# (Swin-B, batch 64, bf16). The overhead is the real loop's time per step over the bare step's:
# 64/499.8 - 64/794.3 images/s = 0.047 s. The rate is the real loop's 499.8 images/s x 1.14e11 training FLOPs per
# Swin-B image at 224 px (6 x 19.0 GMACs of the pretraining forward, encoder and decoder: models/flops.py's
# train_flops_per_image, `mixmae model info --size base`, benchmarks/results/attention_flops.json) = 5.7e13 FLOP/s.
STEP_OVERHEAD_S = 0.047
FLOP_RATE = 5.7e13


def estimated_seconds(run: PlannedRun) -> float:
    return run.steps * STEP_OVERHEAD_S + run.flops / FLOP_RATE


def start_order(run: PlannedRun) -> tuple[float, float]:
    """Iso-FLOP budgets from the smallest, each budget's runs longest first; a grid's runs longest first.

    Longest first keeps a long run started last from holding up the end. Budgets in turn make a sweep cut short
    (a time limit, a device lent for minutes) leave whole iso-FLOP curves, each a result, rather than parts of every
    curve; that costs the gap a budget's long runs leave at its end. For the GPU study, simulated from its cost
    estimate (benchmarks/results/sweep_schedule_gpu_iso_flop.json): 441 s instead of 316 s, but at 1.5x the
    estimate 4 whole curves by 390 s instead of none."""
    return (run.budget or 0.0, -estimated_seconds(run))


class RunQueue:
    """The runs still to start, shared by the workers: each takes the next when it is free, until it is stopped."""

    def __init__(self, items: list[tuple[int, PlannedRun]]) -> None:
        self._items, self._lock, self.stopped = list(items), threading.Lock(), False

    def take(self) -> tuple[int, PlannedRun] | None:
        with self._lock:
            return self._items.pop(0) if self._items and not self.stopped else None

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def left(self) -> int:
        with self._lock:
            return len(self._items)


class SweepStop:
    """Ctrl-C, or a SIGTERM to the sweep's own process (`kill PID`), while runs are under way: no run starts after it,
    and each worker process is sent SIGTERM, on which its run saves at the next step boundary and ends
    (engine/preemption.py); the sweep then says what ran, stopped and did not start. Before, the main thread's
    KeyboardInterrupt left the workers' threads to start every remaining run (a Ctrl-C ran the sweep to its end, then
    printed a traceback), and a SIGTERM killed the sweep alone, its workers training on, orphaned."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, queue: RunQueue) -> None:
        self.queue, self.signal = queue, None
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # a second signal runs the handler again inside the first

    def __call__(self, signum: int, frame: object = None) -> None:
        self.signal = signum
        self.queue.stop()
        with self._lock:
            for process in list(self._processes):
                _terminate(process)

    def started(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)
            if self.signal is not None:  # started as the signal came
                _terminate(process)

    def ended(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    @contextlib.contextmanager
    def installed(self):
        """Its handlers for SIGINT and SIGTERM while the runs are under way (Python runs handlers in the main thread
        only: elsewhere, as in a thread of a caller's own, nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def _terminate(process: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):  # already gone
        process.send_signal(signal.SIGTERM)


def _pretrain_args(spec: SweepSpec, run: PlannedRun, out: Path, threads: int) -> list[str]:
    data, samples = run_data(spec, run.data_fraction, out)
    steps_per_epoch = max(1, samples // run.global_batch)
    sets = [arg for item in run_overrides(run, data, steps_per_epoch, spec.name) for arg in ("--set", item)]
    return ["pretrain", "--profile", spec.profile, "--run-dir", str(out / "runs" / run.run_id), "--max-steps",
            str(run.steps), *sets, "--set", f"data.num_threads={threads}"]


WORKER = [sys.executable, "-m", "mixmae_scale.scaling.in_process"]


def _worker(queue: RunQueue, share: DeviceShare, job_args, finished, command: list[str] = WORKER,
            stop: SweepStop | None = None) -> None:
    """One slot of the device: a process (`in_process`) takes runs from `queue` one at a time, up to
    `share.per_process`, then a fresh one takes over, until the queue is empty (or stopped). Each run is reported by
    `finished` as its marker arrives, with the output it printed (shown when it failed); a run whose process died is
    reported failed, and the next run gets a new process. `stop` is told of each process, to signal it."""
    item = queue.take()  # taken before a process starts: no process is started for an empty queue
    while item is not None:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "OMP_NUM_THREADS": str(share.threads)})
        if stop is not None:
            stop.started(process)
        try:
            for _ in range(share.per_process):
                index, run = item
                code, wall_s, output = _run_in(process, run, job_args(run))
                finished(index, run, code, wall_s, output)
                item = queue.take()
                if item is None or process.poll() is not None:
                    break
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()
            process.stdout.read()  # drained: a process that prints on its way out must not block on a full pipe
            process.wait()
            if stop is not None:
                stop.ended(process)


def _run_in(process: subprocess.Popen, run: PlannedRun, args: list[str]) -> tuple[int, float, str]:
    """Hands `run` to the worker process and reads its output up to the run's marker: (exit code, wall s, output).
    The marker is looked for anywhere in a line: output written without a newline must not hide it."""
    output: list[str] = []
    try:
        process.stdin.write(json.dumps({"run_id": run.run_id, "args": args}) + "\n")
        process.stdin.flush()
    except OSError:  # the process has died (its output says why)
        return process.wait() or 1, 0.0, process.stdout.read()
    for line in process.stdout:
        at = line.find(MARKER)
        if at < 0:
            output.append(line)
            continue
        output.append(line[:at])
        _, run_id, code, wall_s = line[at:].split()
        if run_id == run.run_id:
            return int(code), float(wall_s), "".join(output)
    return process.wait() or 1, 0.0, "".join(output)  # died during the run


def _complete(run_dir: Path, run: PlannedRun) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and ran_to_its_end(json.loads(summary.read_text()), run)


def ran_to_its_end(summary: dict, run: PlannedRun) -> bool:
    """The run reached the last step of its own schedule, not a stop (a time limit's signal). That its schedule is
    the plan's is `schedule_mismatch`'s to say: its own can end a few steps before the plan's (a held-out tail), and
    `_row` records the steps it took."""
    if summary.get("stopped_by_signal"):
        return False
    steps = summary.get("steps")
    return steps is not None and steps >= summary.get("planned_steps", run.steps)


def _data_read_if_here(spec: SweepSpec, run: PlannedRun, out: Path) -> dict:
    """`data_read`, where the shards can be read (a run read from its folder may have run where they are not)."""
    try:
        return data_read(spec, run.data_fraction, out)
    except DataError:
        return {}


def _refuse_other_plans(spec: SweepSpec, runs: list[PlannedRun], out: Path, recorded: set[str],
                        lr_pending: bool = False) -> None:
    """Before any run starts: the folders of runs not yet recorded must hold this plan's runs (or none), finished
    (`_other_plan`: its schedule's end) or not (`_other_config`: what it was started with). `lr_pending`: the lr
    sweep has yet to choose the base lr, which is judged once it has, before the study's runs start."""
    others = [f"{out / 'runs' / run.run_id}: {said}" for run in runs if run.run_id not in recorded
              and (said := _other_plan(out / "runs" / run.run_id, run)
                   or _other_config(spec, run, out / "runs" / run.run_id, out, lr_pending))]
    if others:
        raise SweepError(f"{len(others)} run folder(s) hold runs of another plan: {' | '.join(others[:5])}"
                         f"{' | ...' if len(others) > 5 else ''}. Remove them to run this plan's runs there, or give "
                         "the spec a new --out")


def _other_plan(run_dir: Path, run: PlannedRun) -> str | None:
    """Why a run folder with a summary holds a run of another plan (None: it is this plan's run, finished or to
    resume). Its summary's own end was the finish line: a folder of 5 steps planned 5, from an earlier spec of 50,
    was read as finished and binned at the full budget."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        return None
    try:
        record = read_record(run_dir)
    except ValueError:  # unreadable (rewritten at its next launch): no held-out tail to allow for
        record = None
    return schedule_mismatch(json.loads(summary.read_text()), run, record)


# What a folder's config.yaml is judged on against the plan: what its run trains on and how its point is measured.
# Not what a launch sets for itself (threads, the world size and micro-batch, the output folder and run name, where
# it decodes); the data's paths are judged by the sets they name (`_data_sets`).
POINT_SECTIONS = ("model.", "optim.", "schedule.", "data.")
POINT_KEYS = ("batch.global_batch", "run.seed", "precision.dtype", "logging.heldout_batches")
NOT_POINT_KEYS = ("data.shards", "data.sources", "data.num_threads", "data.decode_device", "data.train_samples")
SHOWN_KEYS = 4  # differing keys named per folder; the rest are counted
SUBSET_NAME = re.compile(r"fraction-[^/]+-[0-9a-f]{12}")  # `subset_shards`' folders


def _other_config(spec: SweepSpec, run: PlannedRun, run_dir: Path, out: Path, lr_pending: bool = False) -> str | None:
    """Why the folder's config.yaml is not what this plan gives its run (None: it is, or there is none). Every start
    of a run writes it, a killed run's too, and the next start resumes from the folder's checkpoint: a killed run of
    an earlier spec under the same id went on under this plan's lr from the other plan's weights, or (another model
    or batch) failed inside `pretrain` after the runs before it had run, with a remedy (--overwrite) the sweep does
    not take; a finished one of the same steps was read as this plan's point. Keys a config.yaml written by an
    earlier version lacks are not compared."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    state = "a finished run" if (run_dir / "summary.json").exists() else "an unfinished run (no summary.json)"
    try:
        recorded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        recorded, problem = None, f"{exc}"
    else:
        problem = "not a mapping of settings"
    if not isinstance(recorded, dict):
        return f"{state} whose config.yaml cannot be read ({problem}): whose plan it is cannot be told"
    forms = _planned_data(spec, run, out)
    skip = {*NOT_POINT_KEYS, *(["optim.base_learning_rate"] if lr_pending else []),
            *([] if forms else ["schedule.epochs", "schedule.warmup_epochs"])}  # epochs: steps / the data's batches
    planned, kept = _flat(_planned_config(spec, run, forms[0] if forms else None)), _flat(recorded)
    said = [f"{key} {kept[key]} in the folder, {value} planned" for key, value in planned.items()
            if (key.startswith(POINT_SECTIONS) or key in POINT_KEYS) and key not in skip and key in kept
            and kept[key] != value]
    data = recorded.get("data") if isinstance(recorded.get("data"), dict) else {}
    if forms and "shards" in data:
        said += _data_differences(_data_sets(str(data["shards"]), data.get("sources") or []),
                                  [_sets_of(sets) for sets, _ in forms])
    if not said:
        return None
    more = f"; {len(said) - SHOWN_KEYS} more" if len(said) > SHOWN_KEYS else ""
    return (f"{state} whose config.yaml is not this plan's ({'; '.join(said[:SHOWN_KEYS])}{more}): a run of another "
            "plan (an earlier spec), resumed it would go on from that plan's weights")


def _flat(tree: object, prefix: str = "") -> dict[str, str]:
    """Dotted keys to their values as JSON, a list a value of its own."""
    if isinstance(tree, dict):
        return {key: value for name, child in tree.items() for key, value in _flat(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True)}


def _planned_data(spec: SweepSpec, run: PlannedRun, out: Path) -> list[tuple[list[str], int]]:
    """The data settings (and samples per epoch) this plan gives the run: its subsets here, first, and at data
    fraction 1 the sets themselves, as lines emitted without their manifests name them (`whole_sets`). Empty where
    neither can be known here (a smaller fraction of sets whose manifests cannot be read): the data and the epochs
    it gives are then not compared."""
    forms = []
    with contextlib.suppress(DataError):
        forms.append(run_data(spec, run.data_fraction, out))
    if run.data_fraction == 1.0:
        forms.append(whole_sets(spec, 1.0, spec.train_samples_for_plan(option=None)))
    return forms


def _planned_config(spec: SweepSpec, run: PlannedRun, form: tuple[list[str], int] | None) -> dict:
    """The settings a start of the run resolves and writes into its config.yaml, as the file holds them."""
    from mixmae_scale.config import load_resolved
    from mixmae_scale.data.loaders import job_crop_scale

    data, samples = form or ([], run.global_batch)
    resolved = load_resolved(spec.profile, overrides=run_overrides(run, data, max(1, samples // run.global_batch),
                                                                   spec.name), world_size=1)
    resolved.config.data.crop_scale = job_crop_scale(resolved.config, "pretrain")  # as the run fills it in
    return yaml.safe_load(yaml.safe_dump(resolved.to_dict()))


def _data_sets(shards: str, sources: list) -> tuple[str, tuple]:
    """The sets data settings name: a sweep's subset by its folder's name under OUT/data (it names its set, that
    set's manifest and the fraction, and moves with OUT), a set by its location; a mixture's weights and splits."""
    return _where(shards), tuple((_where(str(s.get("shards"))), float(s.get("weight", 1.0)), s.get("split") or "train")
                                 for s in sources if isinstance(s, dict))


def _sets_of(data: list[str]) -> tuple[str, tuple]:
    settings = dict(item.split("=", 1) for item in data)
    return _data_sets(settings["data.shards"], json.loads(settings.get("data.sources", "[]")))


def _where(location: str) -> str:
    from mixmae_scale.data import storage

    if storage.is_remote(location):
        return location
    path = Path(os.path.normpath(location))
    return f"{path.parent.name}/{path.name}" if SUBSET_NAME.fullmatch(path.name) else str(path)


def _data_differences(kept: tuple[str, tuple], planned: list[tuple[str, tuple]]) -> list[str]:
    """How the folder's data differs from every form of the plan's (none: it is one of them)."""
    if kept in planned:
        return []
    said = []
    if kept[0] not in [p[0] for p in planned]:
        said.append(f"data.shards {kept[0]} in the folder, {planned[0][0]} planned")
    if kept[1] not in [p[1] for p in planned]:
        said.append(f"data.sources {list(kept[1])} in the folder, {list(planned[0][1])} planned")
    return said or [f"data {kept} in the folder, {planned[0]} planned"]


def schedule_mismatch(summary: dict, run: PlannedRun, record: dict | None) -> str | None:
    """Whether the folder's own schedule ends where the plan's does: at the plan's steps; or one step later, where
    the epochs the sweep sets (steps / steps per epoch) round up a step and nothing caps them (`mixmae launch` lines
    carry no --max-steps); or a few steps before, by as much as a held-out tail of the train split (a set without a
    validation split, run.json's held-out entry) shortens the run's epochs: at most ceil(S x (tail + batch) /
    (samples - batch)) of S steps, samples being the train split's before the cut. Anything else is another plan's."""
    own = summary.get("planned_steps", summary.get("steps"))
    if own is None or run.steps <= own <= run.steps + 1:
        return None
    allowed = 0
    data = (record or {}).get("data") or []
    heldout = next((d for d in data if d.get("role") == "held-out" and d.get("train_tail")), None)
    train = [d for d in data if d.get("role") == "train" and heldout is not None and d.get("split") ==
             heldout.get("split") and same_location(str(d.get("location")), str(heldout.get("location")))]
    if heldout is not None and len(train) == 1:  # a mixture's sets are other folders: no tail cut from them
        batch, samples = run.global_batch or run.images_seen // run.steps, int(train[0].get("samples") or 0)
        allowed = (math.ceil(run.steps * (heldout["train_tail"] + batch) / (samples - batch)) if samples > batch
                   else run.steps)
    if run.steps - allowed <= own < run.steps:
        return None
    tail = f"; a held-out tail allows {allowed} step(s) fewer" if allowed else ""
    return (f"its own schedule ends at step {own}, the plan's at {run.steps}{tail}: a run of another plan (an earlier "
            "spec or --max-steps), not a point of this one")


def _row(spec: SweepSpec, run: PlannedRun, run_dir: Path, wall_s: float | None, subset: Path | None = None) -> dict:
    """The results.jsonl line of a finished run folder; `wall_s` None: the run's own wall time."""
    summary = json.loads((run_dir / "summary.json").read_text())
    record = read_record(run_dir)
    mismatch = schedule_mismatch(summary, run, record)
    if mismatch:
        raise RuntimeError(f"run {run.run_id} ({run_dir}): {mismatch}")
    if not ran_to_its_end(summary, run):  # its checkpoint resumes it
        raise RuntimeError(f"run {run.run_id} ({run_dir}): stopped at step {summary.get('steps')} of "
                           f"{summary.get('planned_steps', run.steps)}, not a point of the study; the same "
                           "`mixmae scaling run` resumes it")
    end = summary.get("heldout_loss_end")
    if end is not None and not (isinstance(end, (int, float)) and math.isfinite(end)):
        raise Diverged(f"run {run.run_id}: held-out loss {end!r} at its end: it diverged, not a point of the study "
                       f"(to run it again, remove {run_dir})")
    if summary.get("heldout_loss_end") is None:
        raise RuntimeError(f"run {run.run_id} ({run_dir}): held-out loss not measured "
                           f"({summary.get('heldout_not_measured')}); a sweep compares held-out losses: give the "
                           "shards a validation split of at least one micro-batch")
    last_row = (run_dir / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
    row = {**asdict(run), "overrides": list(run.overrides), "train_loss": float(last_row[3]),
           "heldout_loss": summary["heldout_loss_end"], "wall_s": wall_s if wall_s is not None else summary["wall_s"],
           **point_provenance(record)}
    if summary["steps"] != run.steps:  # what it trained, not what was planned: C and D follow its steps
        scale = summary["steps"] / run.steps
        row.update(steps=summary["steps"], images_seen=round(run.images_seen * scale), flops=run.flops * scale,
                   planned_steps=run.steps)
    if spec.probe:
        row["probe_top1"] = _probe(run_dir, subset or Path(spec.shards))
    return row


def _probe(run_dir: Path, shards: Path) -> float:
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import linear_probe

    state, arch = load_encoder(run_dir)
    return linear_probe(state, arch, str(shards), load_split(shards, "train").num_classes).top1
