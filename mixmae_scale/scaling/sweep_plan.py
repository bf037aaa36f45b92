"""`OUT/plan.json`: the runs the spec plans, recorded by every `scaling run`, so that `scaling fit` and `scaling
report`, which read the sweep folder and not the spec, fit the spec's points only.

A run id names size, budget (or steps) and seed. A size or budget dropped from the spec leaves its rows in
results.jsonl, where they stay (runs that happened), and the fit took them with the spec's: a budget's parabola
through a size the study no longer has, the minima of a budget it dropped. Rows of runs outside the plan are left
out of the fit and the report, counted and named in the command's output, in fit.json and in report.md; the plan's
own rows are fitted exactly as they are alone. A folder from before plans were recorded is fitted whole, and the
command says that it cannot tell.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.errors import plural
from mixmae_scale.scaling.fit import FitError
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec

PLAN = "plan.json"
FORMAT = "mixmae-scale-sweep-plan"
SHOWN_IDS = 10  # run ids named in a line; the rest are counted


def _spec_digest(path: str | None) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def write_plan(out: Path, spec: SweepSpec, runs: list[PlannedRun]) -> None:
    """Written whole (atomic) before any run starts, so that a sweep cut short still names its plan. The spec's
    digest lets the fit say when the spec has changed since."""
    out.mkdir(parents=True, exist_ok=True)
    where = str(Path(spec.file).absolute()) if spec.file else None  # `scaling report` may run from elsewhere
    plan = {"format": FORMAT, "sweep": spec.name, "spec": where, "spec_sha256": _spec_digest(where),
            "runs": [run.run_id for run in runs]}
    write_text(out / PLAN, json.dumps(plan, indent=1) + "\n")


def read_plan(out: Path) -> dict | None:
    """The recorded plan, or None where `scaling run` has not written one; one that is not a plan is refused naming
    the file (fitting every row instead would undo what it is there for)."""
    path = out / PLAN
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FitError(f"{path}: cannot be read as the sweep's plan ({exc}); `mixmae scaling run` with the spec "
                       "writes it again") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT or not isinstance(plan.get("runs"), list):
        raise FitError(f"{path}: not a sweep plan (format {FORMAT}, with its runs); `mixmae scaling run` with the "
                       "spec writes it again")
    return plan


def named(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN_IDS]) + (f", ... ({len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


@dataclass(frozen=True)
class Selection:
    """The rows to fit, the run ids left out (sorted) and what the command says of them."""

    rows: list[dict]
    left_out: list[str]
    warnings: list[str]
    missing: dict[str, str] = field(default_factory=dict)  # planned run id -> why it has no row
    planned: int = 0  # the plan's runs; 0 without a plan


def rows_of_plan(rows: list[dict], out: Path) -> Selection:
    """The rows of runs the recorded plan holds. Left out rows are named; none left: refused (nothing to fit)."""
    results = out / "results.jsonl"
    plan = read_plan(out)
    if plan is None:
        return Selection(rows, [], [f"{out} has no {PLAN} (written by `mixmae scaling run` since it records its "
                                    f"plan): every row of {results} is fitted, including any of runs the spec no "
                                    "longer plans; run `mixmae scaling run` with the spec once to record its plan"])
    planned = set(plan["runs"])
    kept = [row for row in rows if row["run_id"] in planned]
    left_out = sorted(row["run_id"] for row in rows if row["run_id"] not in planned)
    spec = plan.get("spec")
    warnings = []
    digest = _spec_digest(spec)
    if digest is not None and plan.get("spec_sha256") not in (None, digest):
        warnings.append(f"{spec} has changed since `mixmae scaling run` recorded its plan ({out / PLAN}): the fit "
                        "takes the runs it planned then; run `mixmae scaling run` with the spec again to plan the "
                        "changed one")
    elif digest is None and spec and plan.get("spec_sha256"):  # a folder copied from another machine
        warnings.append(f"{spec}, the spec {out / PLAN} was recorded from, cannot be read here: whether it has "
                        "changed since is not checked; the fit takes the runs it planned then")
    if left_out:
        warnings.append(f"{plural(len(left_out), 'row')} of {results} "
                        f"{'is a run' if len(left_out) == 1 else 'are runs'} the spec no longer plans ({out / PLAN}, "
                        f"from {spec}), left out of the fit and the report: {named(left_out)}")
    recorded = {row["run_id"] for row in kept}
    missing = {run_id: why_no_row(out / "runs" / run_id) for run_id in plan["runs"] if run_id not in recorded}
    if missing:
        warnings.append(missing_line(missing, len(planned)))
    if not kept:
        raise FitError(f"{results}: none of its {plural(len(rows), 'row')} is a run of the plan {out / PLAN} "
                       f"records (from "
                       f"{spec}): nothing to fit; run `mixmae scaling run` with the spec")
    return Selection(kept, left_out, warnings, missing, len(planned))


DIVERGED = "diverged"
WHY_NO_ROW = (DIVERGED, "finished, not yet read into results.jsonl", "started but not finished", "not started")


def why_no_row(run_dir: Path) -> str:
    """Why a planned run has no row, from its folder: a run that diverged (its summary's held-out loss not finite),
    one whose summary the sweep has not read yet (`scaling run` reads it), one started and stopped, killed or failed
    before its end, or none at all. A stopped run writes its summary too (`stopped_by_signal`, steps short of
    `planned_steps`: `recorded.ran_to_its_end`), and was once named finished: the same `scaling run` resumes it."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return WHY_NO_ROW[2] if run_dir.is_dir() else WHY_NO_ROW[3]
    if not isinstance(summary, dict):
        return WHY_NO_ROW[2]
    steps, planned = summary.get("steps"), summary.get("planned_steps")
    if summary.get("stopped_by_signal") or (isinstance(steps, int) and isinstance(planned, int) and steps < planned):
        return WHY_NO_ROW[2]
    end = summary.get("heldout_loss_end")
    if isinstance(end, (int, float)) and not math.isfinite(end):
        return DIVERGED
    return WHY_NO_ROW[1]


def missing_line(missing: dict[str, str], planned: int) -> str:
    """The plan's runs without a row, grouped by why: a budget whose every run diverged vanished from the report
    without a word, and a parabola through the sizes left read as that budget's whole measurement."""
    groups = [f"{len(ids)} {why} ({named(sorted(ids))})" for why in WHY_NO_ROW
              if (ids := [run_id for run_id, said in missing.items() if said == why])]
    have = "has" if len(missing) == 1 else "have"
    return (f"{len(missing)} of the plan's {plural(planned, 'run')} {have} no row in results.jsonl and "
            f"{'is' if len(missing) == 1 else 'are'} not in the fit: {', '.join(groups)}; `mixmae scaling run` "
            "with the spec runs or reads the unfinished ones (a diverged run is not a point: its budget's parabola "
            "is through the sizes left)")


def not_planned(results: list[dict], runs: list[PlannedRun]) -> list[str]:
    """Recorded run ids the plan does not hold, sorted: `scaling run` names them."""
    planned = {run.run_id for run in runs}
    return sorted(row["run_id"] for row in results if row["run_id"] not in planned)
