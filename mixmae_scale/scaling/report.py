"""From results.jsonl to fitted laws (fit.json) and a Markdown report (its figures: scaling/figures.py)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.errors import plural
from mixmae_scale.scaling.fit import (
    FitError,
    LawFit,
    compute_optimal,
    configuration,
    configurations,
    extrapolation_error,
    fit_compute,
    fit_nd,
)
from mixmae_scale.scaling.intervals import EXPONENT_WIDTH, IDENTIFIED_FACTOR, format_interval
from mixmae_scale.scaling.isoflop import PowerLaw, degrees_of_freedom, fit_iso_flop, flops_per_image_law

ISO_FLOP_HEADING = "## Iso-FLOP (approach 2): a parabola in log N per budget"
REQUIRED = ("run_id", "params", "images_seen", "flops", "heldout_loss")


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FitError(f"{path.absolute()}: not found, no results yet; run `mixmae scaling run` first (or give "
                       "the sweep's --out)")
    rows: list[dict] = []
    lines: list[int] = []
    seen: dict[str, dict] = {"run_id": {}, "seed": {}}
    text = path.read_text()
    numbered = list(enumerate(text.splitlines(), start=1))
    for number, line in numbered:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == numbered[-1][0] and not text.endswith("\n"):  # an append interrupted: said as that
                raise FitError(f"{path}:{number}: the last line was cut short ({len(line.encode())} bytes without a "
                               "newline: a sweep killed while writing it, or one still writing); `mixmae scaling run` "
                               "with the spec and this --out removes it (its run is read again from its folder), or "
                               "remove that line") from exc
            raise FitError(f"{path}:{number}: not JSON: {exc}") from exc
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise FitError(f"{path}:{number}: run {row.get('run_id', '?')} lacks {', '.join(missing)}")
        _check_point(path, number, row)
        for key in ("run_id", "seed"):
            what = row["run_id"] if key == "run_id" else _seed_key(row)
            if what is not None and what in seen[key]:
                earlier, earlier_run = seen[key][what]
                same = ("" if key == "run_id"
                        else f" (run {earlier_run}: the same size, settings, data, N, D, C and seed)")
                raise FitError(f"{path}:{number}: run {row['run_id']} repeats line {earlier}{same}; each run once, "
                               "or its seeds would count twice (a results file appended to twice, or two sweeps' "
                               "files joined?): keep one line per run")
            seen[key][what] = (number, row["run_id"])
        rows.append(row)
        lines.append(number)
    if not rows:
        raise FitError(f"{path}: empty")
    _check_one_design(path, rows, lines)
    return rows


def _check_one_design(path: Path, rows: list[dict], lines: list[int]) -> None:
    """Rows of one sweep: two sweeps' rows fitted together pooled two model families in a budget, and one row
    without a budget among iso-FLOP rows dropped the whole iso-FLOP analysis without a word."""
    firsts: dict[str, int] = {}
    for row, number in zip(rows, lines, strict=True):
        if row.get("sweep") is not None:
            firsts.setdefault(row["sweep"], number)
    if len(firsts) > 1:
        named = ", ".join(f"'{name}' from line {number}" for name, number in firsts.items())
        raise FitError(f"{path}: rows of {len(firsts)} sweeps ({named}); fit each sweep's results on its own")
    budgets = [row.get("budget") is not None for row in rows]
    if any(budgets) and not all(budgets):
        number = lines[budgets.index(False)]
        raise FitError(f"{path}:{number}: run {rows[budgets.index(False)]['run_id']} has no iso-FLOP budget and "
                       "other rows have one: rows of another sweep design? Fit each sweep's results on its own")


def _seed_key(row: dict) -> tuple | None:
    """Two runs of one configuration with one seed are the same measurement (a row written twice). A grid's data
    fractions, or sizes whose settings change neither N nor C, are other runs with the same N, D and C. The same
    key as the fits' points (`configuration`), so that what is read as two seeds is fitted as two seeds."""
    if row.get("seed") is None:
        return None
    return configuration(row), row["seed"]


def _check_point(path: Path, number: int, row: dict) -> None:
    """A point is finite numbers above zero: a NaN loss would turn a budget's minimum into an edge, a null one
    raised a TypeError, a negative one was fitted."""
    for key in REQUIRED[1:]:
        value = row[key]
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number_ok or not math.isfinite(value) or value <= 0:
            raise FitError(f"{path}:{number}: run {row['run_id']}: {key}={value!r}; a point needs a finite number "
                           "above zero (a diverged or unfinished run is not a point: remove its line)")


def frontier(c: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the compute-efficient runs: lower loss than every run with less compute; of runs with equal
    compute only the best."""
    keep, best = [], np.inf
    for value in np.unique(c):
        group = np.flatnonzero(c == value)
        i = int(group[np.argmin(loss[group])])
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


def frontier_compute(rows: list[dict]) -> np.ndarray:
    """The compute a run is compared at on the frontier: its planned budget in an iso-FLOP design (the sizes of
    one budget spend it to within a step, and a size 0.4% under it is no cheaper run), its FLOPs otherwise."""
    if all(r.get("budget") for r in rows):
        return np.array([r["budget"] for r in rows], float)
    return np.array([r["flops"] for r in rows], float)


def _law_json(law: LawFit) -> dict:
    return {"values": law.values, "intervals_5_95": law.intervals, "verdicts": law.verdicts(),
            "identified": law.identified, "log_rms": law.residual_rms, "bootstrap_resamples": law.rounds,
            "refitted": law.refitted, "distinct_refits": law.judged.distinct, "resamples": law.judged.resamples(),
            "not_a_scaling_law": law.judged.not_a_law or None}


HOLDOUT = 2  # compute levels the L(C) check holds out


def _extrapolation(law: LawFit | None, c: np.ndarray, loss: np.ndarray, groups: np.ndarray,
                   levels: np.ndarray, rounds: int = 0, seed: int = 0) -> dict:
    """The check of L(C): refitted without the two largest compute levels of the set it was fitted on (every seed
    of them, the same points as the law), predicting their points' mean losses. Run only when L(C) itself is
    identified: checking a law the data do not pin down says nothing."""
    check: dict = {"law": "L(C) = E + A C^-alpha", "method": f"refitted without the {HOLDOUT} largest compute levels "
                   "of its fitted set (every seed of them), predicting their points' mean losses"}
    count = len(np.unique(levels))
    if law is None:
        check["result"] = "not run: L(C) was not fitted"
    elif not law.identified:
        check["result"] = "not run: L(C) is not identified"
    elif count < HOLDOUT + 4:
        check["result"] = (f"not run: needs at least {HOLDOUT + 4} compute levels on the fitted set (4 to fit, "
                           f"{HOLDOUT} to predict), got {count}")
    else:
        try:
            check["result"] = extrapolation_error(c, loss, HOLDOUT, groups, levels, rounds, seed)
        except FitError as exc:
            check["result"] = f"not computed: the refit on the {count - HOLDOUT} smaller compute levels failed: {exc}"
    return check


FRONTIER_CONFIGURATIONS = 4  # E + A C^-alpha has 3 parameters


def _compute_fit_set(rows: list[dict], groups: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, int]:
    """The runs L(C) is fitted on: every seed of the configurations on the compute frontier (judged on their mean
    loss), and how many configurations those are. With fewer than 4 it is not fitted: it once fell back to every
    run, which fits the runs' average at each C (an iso-FLOP budget's sizes far from its optimum among them), and
    called E = 4.8 identified for a law whose E is 0.4 (tests/unit/test_scaling_report.py)."""
    compared_at = frontier_compute(rows)
    ids = np.unique(groups)
    means = np.array([loss[groups == g].mean() for g in ids])
    at = np.array([compared_at[groups == g][0] for g in ids])
    front = ids[frontier(at, means)]
    return np.flatnonzero(np.isin(groups, front)), len(front)


def fit_results(rows: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
    """Every fit the report shows, with what supports it. `seed` seeds every bootstrap: the same results and
    arguments give the same fit.json and report.md."""
    c = np.array([r["flops"] for r in rows], float)
    n = np.array([r["params"] for r in rows], float)
    d = np.array([r["images_seen"] for r in rows], float)
    loss = np.array([r["heldout_loss"] for r in rows], float)
    groups = configurations(rows)
    use, front = _compute_fit_set(rows, groups, loss)
    result: dict = {"runs": len(rows), "configurations": len(np.unique(groups)),
                    "bootstrap": {"rounds": bootstrap, "seed": seed}, "identified_factor": IDENTIFIED_FACTOR,
                    "exponent_width": EXPONENT_WIDTH,
                    "frontier_runs": [rows[i]["run_id"] for i in use],
                    "compute_fit_on": f"the compute frontier: {plural(front, 'configuration')}"}
    law_c = None
    # One configuration per compute level on the frontier: 4 of them are the 4 levels 3 parameters need.
    if front < FRONTIER_CONFIGURATIONS:
        result["L_of_C"] = ("not fitted: the compute frontier (the lowest mean loss at a compute level, below every "
                            f"smaller one's) has {plural(front, 'configuration')}, one per compute level; E + A "
                            f"C^-alpha has 3 parameters and needs {FRONTIER_CONFIGURATIONS}. Every run instead would "
                            "fit the runs' average at each C, not the lowest loss")
    else:
        try:
            law_c = fit_compute(c[use], loss[use], bootstrap=bootstrap, seed=seed, groups=groups[use])
        except FitError as exc:  # e.g. a few budgets whose losses drop too steeply for E + A C^-alpha
            result["L_of_C"] = f"not fitted: {exc}"
        else:
            result["L_of_C"] = _law_json(law_c)
    result["extrapolation"] = _extrapolation(law_c, c[use], loss[use], groups[use], frontier_compute(rows)[use],
                                             bootstrap, seed)
    flops = flops_per_image_law(rows)
    result["flops_per_image"] = {"law": "f(N) = k N^s training FLOPs per image, fitted in log-log across the sizes",
                                 "k": math.exp(flops[0]), "s": flops[1]}
    try:
        law_nd = fit_nd(n, d, loss, bootstrap=bootstrap, seed=seed, groups=groups)
    except FitError as exc:
        result["L_of_N_D"] = f"not fitted: {exc}"
        result["compute_optimal"] = "not computed: L(N, D) was not fitted"
    else:
        result["L_of_N_D"] = _law_json(law_nd)
        result["compute_optimal"] = _compute_optimal(law_nd, c, n, d, flops)
    if all(r.get("budget") for r in rows):
        result["iso_flop"] = iso_flop_summary(rows, bootstrap, seed)
    return result


def _compute_optimal(law: LawFit, c: np.ndarray, n: np.ndarray, d: np.ndarray,
                     flops: tuple[float, float]) -> list[dict] | str:
    """The split of budgets from the smallest C trained to 100x the largest, under C = f(N) D with `flops` = (ln k,
    s) of f(N) = k N^s: the accounting the iso-FLOP D* uses (one median C / (N D) for every size took the FLOPs
    per image as proportional to N, which a Swin's are not). A row is within the runs only when its C is, as well
    as its N* and D*: each within its own range, a budget 10x past the largest was said to be "within"."""
    if not law.identified:
        unidentified = sum(v != "identified" for v in law.verdicts().values())
        return f"not identified: {unidentified} of {len(law.names)} parameters of L(N, D) are not identified"
    budgets = np.logspace(np.log10(c.min()), np.log10(c.max() * 100), 5)
    n_opt, d_opt = compute_optimal(law, budgets, float(np.exp(flops[0])), flops[1])
    return [{"flops": float(b), "params": float(a), "images": float(i),
             "within_trained": bool(c.min() <= b <= c.max() and n.min() <= a <= n.max() and d.min() <= i <= d.max())}
            for b, a, i in zip(budgets, n_opt, d_opt, strict=True)]


def _power_law_json(law: PowerLaw) -> dict:
    """`exponent_5_95` spans the bootstrap's interval (`bootstrap_5_95`) and the residuals' (`line_check`); the
    verdict is judged on it."""
    check = law.check and {"degrees_of_freedom": law.check.dof, "residual_rms_ln": law.check.residual_rms,
                           "noise_rms_ln": law.check.noise_rms, "residual_5_95": law.check.interval,
                           "exceeds_seeds": law.check.exceeds}
    return {"exponent": law.exponent, "coefficient": law.coefficient, "exponent_5_95": law.interval,
            "bootstrap_5_95": law.noise_interval, "line_check": check, "identified": law.identified,
            "verdict": law.verdict, "budgets": law.budgets}


def iso_flop_summary(rows: list[dict], bootstrap: int, seed: int = 0) -> dict | str:
    """Approach 2: per-budget parabola minima, N*(C), D*(C) and L*(C) through the interior ones."""
    try:
        fit = fit_iso_flop(rows, bootstrap=max(bootstrap, 200), seed=seed)
    except FitError as exc:
        return f"not fitted: {exc}"
    minima = [{"budget": m.budget, "sizes": m.sizes, "seeds": m.seeds, "interior": m.interior, "n_opt": m.n_opt,
               "n_opt_5_95": m.n_interval, "loss_opt": m.loss_opt, "loss_opt_5_95": m.loss_interval,
               "no_interval": m.missing if m.n_interval is None else None,
               "best_measured": {"params": m.best_n, "loss": m.best_loss}} for m in fit.minima]
    loss_law = fit.loss_opt if isinstance(fit.loss_opt, str) else {**_law_json(fit.loss_opt),
                                                                   "budgets": fit.n_opt.budgets}
    return {"minima": minima, "interior_budgets": sum(m.interior for m in fit.minima),
            "bootstrap_rounds": fit.rounds, "N_opt": _power_law_json(fit.n_opt), "D_opt": _power_law_json(fit.d_opt),
            "L_opt_of_C": loss_law, "L_opt_extrapolation": fit.extrapolation,
            **({"left_out": fit.left_out} if fit.left_out else {})}


def results_file(results: Path, where: Path) -> dict:
    """What fit.json, report.md and each figure say of the results they come from: the file relative to `where` (the
    folder the naming file is written to, so that the name still leads there when the study moves), its sha256 (the
    same wherever it is copied) and its rows. A figure pasted into slides or a fit.json sent on named nothing."""
    data = results.read_bytes()
    return {"file": os.path.relpath(results.absolute(), where.absolute()), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": sum(1 for line in data.decode().splitlines() if line.strip())}


def source_line(results: dict) -> str:
    return f"{results['file']} (sha256 {results['sha256'][:12]}, {results['rows']} rows)"


def write_fit(fit: dict, path: Path) -> None:
    """fit.json, atomically; a NaN or inf anywhere in it is a bug, refused here rather than written as
    invalid JSON."""
    write_text(path, json.dumps(fit, indent=2, allow_nan=False) + "\n")


def write_report(rows: list[dict], fit: dict, out: Path, results: Path | None = None) -> Path:
    """report.md and its figures. A law's fit line, optimal split or extrapolation appears only when the law is
    identified; otherwise the report says so where it would have been. `results`: the file the rows were read from,
    named in report.md and on every figure (`results_file`)."""
    out.mkdir(parents=True, exist_ok=True)
    from mixmae_scale.scaling.figures import write_figures

    source = source_line(results_file(results, out)) if results is not None else None
    figures, not_drawn = write_figures(rows, fit, out, source)
    report = out / "report.md"
    write_text(report, report_markdown(rows, fit, figures, not_drawn, source))
    return report


def report_markdown(rows: list[dict], fit: dict, figures: list[str], not_drawn: dict[str, str] | None = None,
                    source: str | None = None) -> str:
    bootstrap = fit["bootstrap"]
    of = f" of `{source}`" if source else ""
    lines = ["# Scaling report", "", f"{plural(len(rows), 'run')}{of}; held-out reconstruction loss with fixed masks "
             f"and seed. Bootstrap: {plural(bootstrap['rounds'], 'resample')} asked for per fit, seed "
             f"{bootstrap['seed']} (the same results give the same report); each fit says how many refitted. L(C) "
             "and L(N, D): parametric, every run redrawn about the fitted law with the scatter of all runs about it "
             "(runs - parameters degrees of freedom); the iso-FLOP fits: parametric too, every run redrawn about its "
             "budget's fitted parabola with the scatter of all runs about their parabolas.", ""]
    left_out = (fit.get("not_in_plan") or {}).get("runs")
    if left_out:  # rows of runs the spec dropped: in results.jsonl, not in this fit
        lines += [f"**{plural(len(left_out), 'row')} of results.jsonl {'is' if len(left_out) == 1 else 'are'} "
                  f"left out: runs the spec no longer plans "
                  f"({', '.join(left_out)}; the plan: {Path(fit['not_in_plan']['plan']).name}, recorded by "
                  "`mixmae scaling run`).** The fits and figures below are of the spec's runs only.", ""]
    if fit.get("not_recorded"):  # planned runs without a row: diverged, unfinished, not started
        lines += [f"**{fit['not_recorded']['said']}.**", ""]
    lines += _runs_table(rows)
    if isinstance(fit.get("iso_flop"), dict):
        lines += _iso_flop_section(fit["iso_flop"])
    elif isinstance(fit.get("iso_flop"), str):  # an iso-FLOP study's own question, unanswered: said, not left out
        lines += ["", ISO_FLOP_HEADING, "", fit["iso_flop"], "",
                  "N*(C), D*(C) and L*(C): not fitted (no iso-FLOP fit)."]
    lines += ["", "## L(C) = E + A C^-alpha", f"on {fit['compute_fit_on']}", ""]
    lines += _law_lines(fit["L_of_C"])
    check = fit["extrapolation"]
    result = check["result"]
    if isinstance(result, dict):
        held = ", ".join(f"{level:.3g}" for level in result["held_out_levels"])
        result = (f"fitted on {result['fitted_levels']} compute levels, predicting "
                  f"{plural(result['held_out_points'], 'point')} ({plural(result['held_out_runs'], 'run')}) at "
                  f"C = {held}: max relative error "
                  f"{100 * result['max_relative_error']:.1f}%, mean {100 * result['mean_relative_error']:.1f}%"
                  + (f"; mean error {_signed_error(result, 'mean_error')}" if "mean_error" in result else ""))
    lines += ["", f"Extrapolation check of {check['law']} ({check['method']}): {result}", "",
              "## L(N, D) = E + A/N^alpha + B/D^beta", ""]
    lines += _law_lines(fit["L_of_N_D"])
    lines += ["", "Compute-optimal allocation from L(N, D):"]
    if isinstance(fit["compute_optimal"], list):
        accounting = fit.get("flops_per_image")
        if accounting:
            lines[-1] += (f" C = f(N) D, f(N) = {accounting['k']:.3g} N^{accounting['s']:.3g} the training FLOPs per "
                          "image fitted across the sizes, as the iso-FLOP D* (a Swin's FLOPs per image are not "
                          "proportional to N).")
        lines += ["", "| C | N* | D* | C, N* and D* within the C, N and D trained |", "|---|---|---|---|"]
        lines += [f"| {p['flops']:.3g} | {p['params']:.3g} | {p['images']:.3g} | "
                  f"{'yes' if p['within_trained'] else '**no**: an extrapolation of the law'} |"
                  for p in fit["compute_optimal"]]
    else:
        lines[-1] += f" {fit['compute_optimal']}."
    lines += [""] + [f"![{name}]({name})" for name in figures]
    lines += [f"- {name} not drawn: {why}." for name, why in (not_drawn or {}).items()]
    return "\n".join(lines) + "\n"


def _runs_table(rows: list[dict]) -> list[str]:
    """One line per run; the code commit and data digest of each (run.json) where results.jsonl has them."""
    provenance = any("commit" in r for r in rows)
    head = ["| run | N | D (images) | C (FLOPs) | held-out loss |" + (" code | data |" if provenance else ""),
            "|---|---|---|---|---|" + ("---|---|" if provenance else "")]
    body = [f"| {r['run_id']} | {r['params']:,} | {r['images_seen']:,} | {r['flops']:.3g} | {r['heldout_loss']:.4f} |"
            + (f" {r.get('commit') or '-'} | {r.get('data_digest') or '-'} |" if provenance else "")
            for r in sorted(rows, key=lambda r: r["flops"])]
    return head + body + [f"\n**Warning:** {warning}" for warning in provenance_warnings(rows)]


def _law_lines(law: dict | str) -> list[str]:
    """A law's parameter table and what its bootstrap rested on, or why it was not fitted."""
    if isinstance(law, str):
        return [law]
    lines = ["| parameter | value | 5-95% bootstrap | identified |", "|---|---|---|---|"]
    for key, value in law["values"].items():
        said = law["verdicts"][key]
        verdict = "yes" if said == "identified" else f"**no**{said.removeprefix('not identified')}"
        interval = law["intervals_5_95"].get(key)
        # A value without a spread (one seed, too few points) is no result: fit.json keeps it, with its verdict.
        shown = f"{value:.4g}" if interval else "-"
        lines.append(f"| {key} | {shown} | {format_interval(interval)} | {verdict} |")
    lines += ["", f"{law['resamples'][0].upper()}{law['resamples'][1:]}."]
    if law.get("not_a_scaling_law"):  # the sign of an exponent is the fit's own, with or without an interval
        lines += ["", f"**Not a scaling law: {law['not_a_scaling_law']}.** No parameter of it is identified, and "
                  "nothing is derived from it: the fit does not show the loss falling as the law says."]
    return lines


def _iso_flop_section(iso: dict) -> list[str]:
    has = "has its" if iso["interior_budgets"] == 1 else "have their"
    lines = ["", ISO_FLOP_HEADING, "",
             f"{iso['interior_budgets']} of {len(iso['minima'])} budgets {has} minimum inside the sizes trained; "
             f"only those feed N*(C), D*(C) and L*(C). Bootstrap: {iso['bootstrap_rounds']} rounds, each redrawing "
             "every run about its budget's fitted parabola and refitting (the scatter pooled over the budgets with "
             "an interior minimum and at least 2 seeds per configuration, on their runs less 3 per budget (its "
             "parabola's coefficients) degrees of freedom; only those budgets get an N* range). "
             "The N* and L* ranges hold the runs' noise, not the parabola's own bias: a parabola through a loss curve "
             "that is not one has its vertex off the true N* (docs/scaling.md)."
             + (f" **{iso['left_out'][0].upper()}{iso['left_out'][1:]}.**" if iso.get("left_out") else ""), "",
             "| budget C | sizes | fewest seeds per configuration | interior | N* | N* 5-95% | L* | "
             "lowest measured: N, loss |",
             "|---|---|---|---|---|---|---|---|"]
    for m in iso["minima"]:
        ci = format_interval(m["n_opt_5_95"], 3) if m["n_opt_5_95"] else f"- ({m['no_interval']})"
        n_opt = f"{m['n_opt']:.3g}" if m["interior"] else "-"
        loss_opt = f"{m['loss_opt']:.4f}" if m["interior"] else "-"
        best = m["best_measured"]
        lines.append(f"| {m['budget']:.3g} | {m['sizes']} | {m['seeds']} | {'yes' if m['interior'] else '**no**'} | "
                     f"{n_opt} | {ci} | {loss_opt} | {best['params']:.3g}, {best['loss']:.4f} |")
    lines.append("")
    for name, label in (("N_opt", "N*(C) = k C^a"), ("D_opt", "D*(C) = k C^b (images)")):
        law = iso[name]
        if law["exponent"] is None:
            lines.append(f"- {label}: **{law['verdict']}**")
            continue
        ci = law["exponent_5_95"]
        if not ci:  # no spread to read it with: the values stay in fit.json
            lines.append(f"- {label}: through {len(law['budgets'])} budgets, no interval: **{law['verdict']}**")
            continue
        text = f"exponent {law['exponent']:.3f} (5-95%: {format_interval(ci, 3)}; {_spread(ci)})"
        verdict = "identified" if law["identified"] else f"**{law['verdict']}**"
        check = law["line_check"]
        noise = format_interval(law["bootstrap_5_95"], 3)
        lines.append(f"- {label}: {text}, k = {law['coefficient']:.3g}, through {len(law['budgets'])} budgets: "
                     f"{verdict}. The interval spans the bootstrap's ({noise}) and the slope's t interval from "
                     "the minima's scatter about the line "
                     f"({format_interval(check['residual_5_95'], 3)}, "
                     f"{degrees_of_freedom(check['degrees_of_freedom'])}): {check['residual_rms_ln']:.2g} rms in ln "
                     f"about it, {check['noise_rms_ln']:.2g} from the runs' noise")
    lines += ["", "L*(C) = E + A C^-alpha through the interior minima:", ""]
    lines += _law_lines(iso["L_opt_of_C"])
    ex = iso["L_opt_extrapolation"]
    lines.append("")
    lines.append(f"Extrapolation check of L*(C) (fitted without the largest interior budget, its L* predicted): {ex}"
                 if isinstance(ex, str) else
                 f"Extrapolation check of L*(C) to the largest interior budget {ex['budget']:.3g}: predicted "
                 f"{ex['predicted']:.4f}, observed {ex['observed']:.4f}, error {_error_and_noise(ex)}")
    return lines


def _error_and_noise(check: dict) -> str:
    """The L*(C) check's error with its 5-95% interval from the runs' noise, and what that says: an error alone could
    not be told from noise. fit.json from before the interval has the error's size alone."""
    if "error" not in check:
        return f"{100 * check['relative_error']:.1f}%"
    return _signed_error(check, "error", " (the parabolas' own bias is not in it)")


def _signed_error(check: dict, key: str, caveat: str = "") -> str:
    """An extrapolation check's signed error, its 5-95% interval (`KEY_5_95`) and whether it holds 0."""
    said = f"{100 * check[key]:+.2f}% (predicted - observed, of observed)"
    interval = check.get(f"{key}_5_95")
    if interval is None:
        return f"{said}; no interval: {check.get('no_interval', 'no bootstrap')}"
    low, high = interval
    holds = ("holds 0: the law's prediction is within the runs' noise" if low <= 0 <= high
             else "excludes 0: the prediction is off by more than the runs' noise explains")
    return (f"{said}, 5-95% over {check['rounds']} bootstrap rounds {100 * low:+.2f}% to {100 * high:+.2f}%, which "
            f"{holds}{caveat}")


def _spread(interval: tuple[float, float]) -> str:
    """An exponent interval's width, and its ends' ratio where they share a sign (a target such as "narrower
    than 2x" reads off it)."""
    low, high = interval
    ratio = f", {max(abs(low), abs(high)) / min(abs(low), abs(high)):.2f}x end to end" if low * high > 0 else ""
    return f"width {high - low:.3g}{ratio}"


def provenance_warnings(rows: list[dict]) -> list[str]:
    """Points of one fit must differ only in what the sweep varies: a second commit (or a tree with uncommitted
    changes) or other held-out data (`data`: the digest of the split every point is scored on) makes their losses
    incomparable. Rows from before run records carry neither and are named too."""
    warnings = []
    for key, what in (("commit", "code commits"), ("data_digest", "held-out data")):
        groups: dict[str, list[str]] = {}
        for row in rows:
            groups.setdefault(row.get(key) or "unknown", []).append(row["run_id"])
        if len(groups) > 1:
            listed = "; ".join(f"{value}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                               for value, ids in sorted(groups.items()))
            warnings.append(f"the points of this fit come from {len(groups)} different {what} ({listed})")
    dirty = [row["run_id"] for row in rows if "+dirty" in str(row.get("commit"))]
    if dirty:
        warnings.append(f"{plural(len(dirty), 'point')} ran from a tree with uncommitted changes "
                        f"({', '.join(dirty[:3])}"
                        f"{' ...' if len(dirty) > 3 else ''}): their code cannot be recovered from the commit")
    return warnings
