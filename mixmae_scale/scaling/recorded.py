"""What a sweep's folder already holds, read back and judged against the plan before any run starts: results.jsonl's
rows (a line cut short by a kill mended, a row of another plan under a run's id refused) and the run folders (finished
at the plan's steps or not, started with the plan's settings or not), and the row a finished folder gives.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

import yaml

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.errors import plural
from mixmae_scale.data.heldout import same_location
from mixmae_scale.data.manifest import DataError, load_split
from mixmae_scale.engine.run_record import point_provenance, read_record
from mixmae_scale.scaling.commands import run_overrides
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec
from mixmae_scale.scaling.subsets import data_read, run_data, whole_sets


class SweepError(RuntimeError):
    """Runs of the sweep failed; the others were recorded and a rerun retries only the failed ones."""


class Diverged(RuntimeError):
    """A run that ended with a non-finite held-out loss: an outcome (its lr is too high for its size), not a point,
    and not a failure to retry: running it again gives the same."""


def rows_of(path: Path) -> list[dict]:
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: Path, text: str | None = None) -> list[tuple[int, dict]]:
    """The rows of results.jsonl (or lr_sweep.jsonl) with their line numbers, each line one finished run's; a line
    that is not one is refused naming path:line (a bare JSON error named no file). `text`: the file's content as
    read (or mended) already."""
    if text is None and not path.exists():
        return []
    rows = []
    for number, line in enumerate((path.read_text() if text is None else text).splitlines(), start=1):
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


def recorded_rows(results: Path) -> dict[str, tuple[int, dict]]:
    """Each recorded run's (line, row), by run id."""
    return {row["run_id"]: (number, row) for number, row in numbered_rows(results)}


def mend_last_line(path: Path, log) -> None:
    """A sweep killed while appending leaves a last line without its newline; the next append would glue a row onto
    it and every later `scaling run` would fail on that line. Whole, it gets its newline; cut short, it goes (said):
    its run's folder is read again, or the run is run again. Rewritten whole (atomic), never in place."""
    if not path.exists():
        return
    data = path.read_bytes()
    mended, cut = mended_last_line(data)
    if mended != data:
        write_text(path, mended.decode())
    if cut:
        log(f"{path}: its last line was cut short ({cut} bytes without a newline: a write interrupted); "
            "removed: that run is read again from its folder, or run again")


def mended_last_line(data: bytes) -> tuple[bytes, int]:
    """(the file as `mend_last_line` leaves it, the bytes of a cut-short last line it removes), written nowhere: a dry
    run reads the rows the sweep would."""
    if not data or data.endswith(b"\n"):
        return data, 0
    cut = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[cut:]), dict)
    except ValueError:
        whole = False
    return (data + b"\n", 0) if whole else (data[:cut], len(data) - cut)


def append_row(results: Path, row: dict) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def row_differences(row: dict, run: PlannedRun, record: dict, data: list[str] | None = None) -> list[str]:
    """How a recorded row's run differs from the planned run of its id. A run id names size, budget (or steps) and
    seed only: a changed size's model, `set:` (batch, precision), profile, mixture or lr rule keeps it, and the old
    row passed for the new plan's point. Keys a row written before does not have are not compared. `data`: the
    subsets the plan's run reads (`data_read`'s `data_subsets`; None where its sets cannot be read here): a row that
    records its own is judged on them, not on where its sets lay (`data.shards`, each source's `shards`), so a set
    moved to another mount is the same data, and another set at the same path is not."""
    by_data = data is not None and "data_subsets" in row
    planned = {"size": run.size, "seed": run.seed, "data_fraction": run.data_fraction, "budget": run.budget,
               "params": run.params, "global_batch": run.global_batch, "steps": run.steps,
               "overrides": list(run.overrides), "profile": record["profile"], "sources": record["sources"],
               **({"data_subsets": data} if by_data else {})}
    said = []
    for key, value in planned.items():
        if key not in row:
            continue
        kept = row.get("planned_steps", row["steps"]) if key == "steps" else row[key]  # steps: the planned ones
        if by_data and key in ("overrides", "sources"):
            kept, value = _unlocated(key, kept), _unlocated(key, value)
        if kept == value:
            continue
        if key == "overrides":
            only_kept, only_planned = [o for o in kept if o not in value], [o for o in value if o not in kept]
            said.append(f"overrides: {', '.join(only_kept) or '-'} recorded, {', '.join(only_planned) or '-'} planned"
                        if only_kept or only_planned else "overrides: the same ones in another order")
        else:
            said.append(f"{key}: {kept!r} recorded, {value!r} planned")
    return said


def _unlocated(key: str, value: object) -> object:
    """A row's overrides or sources less where its sets lay."""
    if not isinstance(value, list):
        return value
    if key == "overrides":
        return [o for o in value if not (isinstance(o, str) and o.startswith("data.shards="))]
    return [{k: v for k, v in s.items() if k != "shards"} if isinstance(s, dict) else s for s in value]


def finished_here(run_dir: Path, run: PlannedRun) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and ran_to_its_end(json.loads(summary.read_text()), run)


def ran_to_its_end(summary: dict, run: PlannedRun) -> bool:
    """The run reached the last step of its own schedule, not a stop (a time limit's signal). That its schedule is
    the plan's is `schedule_mismatch`'s to say: its own can end a few steps before the plan's (a held-out tail), and
    `folder_row` records the steps it took."""
    if summary.get("stopped_by_signal"):
        return False
    steps = summary.get("steps")
    return steps is not None and steps >= summary.get("planned_steps", run.steps)


def diverged(end: object) -> bool:
    """Whether a finished run's held-out loss at its end (summary.json's `heldout_loss_end`) says it diverged: the
    sweep records no row for it (`folder_row` raises Diverged), and `scaling run --dry-run` says so with the same
    rule. None is a loss not measured, which the sweep counts failed instead."""
    return end is not None and not (isinstance(end, (int, float)) and math.isfinite(end))


def data_read_if_here(spec: SweepSpec, fraction: float, out: Path) -> dict:
    """`data_read`, where the shards can be read (a run read from its folder may have run where they are not)."""
    try:
        return data_read(spec, fraction, out)
    except DataError:
        return {}


def refuse_other_plans(spec: SweepSpec, runs: list[PlannedRun], out: Path, recorded: set[str],
                        lr_pending: bool = False) -> None:
    """Before any run starts: the folders of runs not yet recorded must hold this plan's runs (or none), finished
    (`other_plan`: its schedule's end) or not (`_other_config`: what it was started with). `lr_pending`: the lr
    sweep has yet to choose the base lr, which is judged once it has, before the study's runs start."""
    others = [f"{out / 'runs' / run.run_id}: {said}" for run in runs if run.run_id not in recorded
              and (said := other_plan(out / "runs" / run.run_id, run)
                   or _other_config(spec, run, out / "runs" / run.run_id, out, lr_pending))]
    if others:
        raise SweepError(f"{plural(len(others), 'run folder')} "
                         f"{'holds a run' if len(others) == 1 else 'hold runs'} of another plan: "
                         f"{' | '.join(others[:5])}{' | ...' if len(others) > 5 else ''}. Remove "
                         f"{'it' if len(others) == 1 else 'them'} to run this plan's runs there, or give the spec a "
                         "new --out")


def other_plan(run_dir: Path, run: PlannedRun) -> str | None:
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
    tail = f"; a held-out tail allows {plural(allowed, 'step')} fewer" if allowed else ""
    return (f"its own schedule ends at step {own}, the plan's at {run.steps}{tail}: a run of another plan (an earlier "
            "spec or --max-steps), not a point of this one")


def folder_row(spec: SweepSpec, run: PlannedRun, run_dir: Path, wall_s: float | None,
               subset: Path | None = None) -> dict:
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
    if diverged(end):
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
