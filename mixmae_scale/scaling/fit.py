"""Scaling-law fits: L(C) = E + A C^-alpha and L(N, D) = E + A / N^alpha + B / D^beta.

Fitted with scipy's least squares on log residuals (log L_pred - log L) with a robust (Cauchy) loss,
from several starting points, keeping the best converged one; uncertainty from a seeded parametric bootstrap
(`_bootstrap`: every run redrawn about the fitted law with the log-residual scatter of all runs about it, on
runs - parameters degrees of freedom; runs of one configuration, `configurations`, are seeds of one point), judged
by `intervals.judge` (a resample whose refit fails counts against the interval, it is not dropped);
the compute-optimal split of a budget between model size and data from the fitted L(N, D).
Parameters are optimised in log space (log A, log E, ...) so that they stay positive; the Jacobians are
analytic: finite differences cost one residual evaluation per parameter at every step, and a report refits
each law some hundreds of times.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from mixmae_scale.scaling.intervals import (
    Interval,
    Judgement,
    Support,
    bootstrap_interval,
    judge,
    lost_rounds,
    too_few_points,
)


class FitError(ValueError):
    """Data that cannot support the requested fit; the message says what is missing."""


# What a sweep sets for a run, besides its seed (`PlannedRun`'s fields; `overrides` also, less `run.seed=`).
DESIGN = ("budget", "size", "data_fraction", "steps", "global_batch")


def configuration(row: dict) -> tuple:
    """The point a run measures: everything the sweep set for it except its seed. N, D and C alone do not tell
    points apart: a grid's data fractions at one step count share them, and grouped by them a one-seed sweep's
    runs became "seeds of one point" with bootstrap intervals and identified laws. Not where the set lay
    (`data.shards=`): a sweep resumed after its shards moved ran its other seeds with another path, and which set
    a row read is `scaling run`'s to judge (its `data_subsets`)."""
    overrides = tuple(str(o) for o in row.get("overrides") or ()
                      if not str(o).startswith(("run.seed=", "data.shards=")))
    return (int(row["params"]), int(row["images_seen"]), float(row["flops"]),
            *(row.get(key) for key in DESIGN), overrides)


def configurations(rows: list[dict]) -> np.ndarray:
    """The point each run measures (an index per row); the runs of one point are its seeds. Rows without a
    `seed` (synthetic ones) are taken as seeds of their configuration. Two runs of one configuration with one seed
    are one measurement twice, not two seeds: refused, naming both."""
    keys = [configuration(r) for r in rows]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    seen: dict[tuple, dict] = {}
    for row, key in zip(rows, keys, strict=True):
        if row.get("seed") is None:
            continue
        first = seen.setdefault((key, row["seed"]), row)
        if first is not row:
            raise FitError(f"runs {first.get('run_id', '?')} and {row.get('run_id', '?')} are one configuration with "
                           f"one seed ({row['seed']}): one measurement twice would count as two seeds; keep one")
    return np.array([index[key] for key in keys], int)


@dataclass
class LawFit:
    names: tuple[str, ...]
    values: dict[str, float]
    residual_rms: float  # of log residuals on the fitted points
    judged: Judgement = field(default_factory=Judgement)  # the bootstrap's intervals and verdicts (`judge`)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    @property
    def intervals(self) -> dict[str, Interval | None]:
        return self.judged.intervals

    @property
    def rounds(self) -> int:
        return self.judged.rounds

    @property
    def refitted(self) -> int:
        return self.judged.refitted

    def verdicts(self) -> dict[str, str]:
        return {name: self.judged.verdicts.get(name, "not identified (no bootstrap)") for name in self.names}

    @property
    def identified(self) -> bool:
        """A law is identified when every parameter is: its derived results (an optimal split, an
        extrapolation, a fit line) use them all."""
        return all(v == "identified" for v in self.verdicts().values())


def compute_law(c: np.ndarray, e: float, a: float, alpha: float) -> np.ndarray:
    return e + a * np.power(c, -alpha)


def nd_law(n: np.ndarray, d: np.ndarray, e: float, a: float, alpha: float, b: float, beta: float) -> np.ndarray:
    return e + a / np.power(n, alpha) + b / np.power(d, beta)


def _check(name: str, inputs: list[np.ndarray], loss: np.ndarray, parameters: int,
           groups: np.ndarray | None) -> np.ndarray:
    """The point each run belongs to (runs with equal inputs, or equal `groups`, are seeds of one point);
    refuses inputs that cannot carry the law."""
    lengths = {len(a) for a in (*inputs, loss)} | ({len(groups)} if groups is not None else set())
    if len(lengths) != 1:
        raise FitError(f"{name}: inputs of different lengths {sorted(lengths)}")
    for a in (*inputs, loss):
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise FitError(f"{name}: every value must be finite and positive")
    if groups is None:
        groups = np.unique(np.column_stack(inputs), axis=0, return_inverse=True)[1].ravel()
    few = too_few_points(name, len(np.unique(groups)), parameters)
    if few:
        raise FitError(few)
    return np.asarray(groups)


def _finite(name: str, values: dict[str, float]) -> dict[str, float]:
    """A parameter that overflowed means the data do not pin the law down (e.g. A with alpha running off)."""
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    if bad:
        raise FitError(f"{name}: the fit diverged ({', '.join(bad)} not finite): the data do not constrain the law")
    return values


def _robust_fit(residuals, jacobian, starts: list[np.ndarray], f_scale: float = 0.02) -> tuple[np.ndarray, float]:
    """The best converged start. A start that runs out of evaluations is running off (alpha up, A overflowing)
    and has not found a fit: it loses, and with no converged start the data do not pin the law down."""
    best = None
    for start in starts:
        try:
            # Bootstrap resamples can push a start into overflow; such starts simply lose.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                result = least_squares(residuals, start, jac=jacobian, loss="cauchy", f_scale=f_scale, max_nfev=1000)
        except (ValueError, FloatingPointError):
            continue
        if result.status <= 0 or not np.isfinite(result.cost):
            continue
        if best is None or result.cost < best.cost:
            best = result
    if best is None:
        raise FitError("no starting point converged: the data do not constrain the law")
    return best.x, float(np.sqrt(np.mean(residuals(best.x) ** 2)))


def fit_compute(c: np.ndarray, loss: np.ndarray, bootstrap: int = 0, seed: int = 0,
                start: dict[str, float] | None = None, groups: np.ndarray | None = None) -> LawFit:
    """`start`: fitted values to begin from. A bootstrap refit starts at the full fit (one start, not eight:
    a 12-run report takes 13 s instead of 206 s). The price: a resample whose best fit lies in another basin can be
    missed, so intervals can come out narrower than a multi-start bootstrap's (measured with the seed-drawing
    bootstrap since replaced, on an earlier window pilot: E 0.42-0.47 against 0.18-0.47).
    `groups`: the point each run measures (default: runs with equal C are seeds of one)."""
    c, loss = np.asarray(c, float), np.asarray(loss, float)
    groups = _check("L(C) = E + A C^-alpha", [c], loss, 3, groups)
    scale = np.median(c)  # fit in C / median(C): exponents do not care, conditioning does

    cs, log_cs = c / scale, np.log(c / scale)

    def residuals(p):
        return np.log(compute_law(cs, np.exp(p[0]), np.exp(p[1]), p[2])) - np.log(loss)

    def jacobian(p):
        e, term = np.exp(p[0]), np.exp(p[1]) * np.power(cs, -p[2])
        return np.column_stack([np.full_like(cs, e), term, -term * log_cs]) / (e + term)[:, None]

    if start:
        starts = [np.array([np.log(start["E"]), np.log(start["A"]) - start["alpha"] * np.log(scale), start["alpha"]])]
    else:
        starts = [np.array([np.log(f * loss.min()), np.log(g), alpha])
                  for f, g, alpha in itertools.product((0.3, 0.8), (0.1, 1.0), (0.1, 0.5))]
    p, rms = _robust_fit(residuals, jacobian, starts)
    with np.errstate(over="ignore"):
        values = {"E": float(np.exp(p[0])), "A": float(np.exp(p[1]) * scale ** p[2]), "alpha": float(p[2])}
    fit = LawFit(("E", "A", "alpha"), _finite("L(C) fit", values), rms)
    _bootstrap(fit, lambda drawn: fit_compute(c, drawn, start=fit.values, groups=groups), groups, bootstrap, seed,
               loss, residuals(p))
    return fit


def fit_nd(n: np.ndarray, d: np.ndarray, loss: np.ndarray, bootstrap: int = 0, seed: int = 0,
           start: dict[str, float] | None = None, groups: np.ndarray | None = None) -> LawFit:
    """`groups`: the point each run measures (default: runs with equal N and D are seeds of one)."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    groups = _check("L(N, D) = E + A/N^alpha + B/D^beta", [n, d], loss, 5, groups)
    n_scale, d_scale = np.median(n), np.median(d)

    ns, ds = n / n_scale, d / d_scale
    log_ns, log_ds = np.log(ns), np.log(ds)

    def residuals(p):
        return np.log(nd_law(ns, ds, np.exp(p[0]), np.exp(p[1]), p[2], np.exp(p[3]), p[4])) - np.log(loss)

    def jacobian(p):
        e, term_n, term_d = np.exp(p[0]), np.exp(p[1]) * np.power(ns, -p[2]), np.exp(p[3]) * np.power(ds, -p[4])
        columns = [np.full_like(ns, e), term_n, -term_n * log_ns, term_d, -term_d * log_ds]
        return np.column_stack(columns) / (e + term_n + term_d)[:, None]

    if start:
        starts = [np.array([np.log(start["E"]), np.log(start["A"]) - start["alpha"] * np.log(n_scale), start["alpha"],
                            np.log(start["B"]) - start["beta"] * np.log(d_scale), start["beta"]])]
    else:
        starts = [np.array([np.log(f * loss.min()), np.log(g), alpha, np.log(g), beta])
                  for f, g, alpha, beta in itertools.product((0.3, 0.8), (0.1, 1.0), (0.2, 0.6), (0.2, 0.6))]
    p, rms = _robust_fit(residuals, jacobian, starts)
    with np.errstate(over="ignore"):
        values = {"E": float(np.exp(p[0])), "A": float(np.exp(p[1]) * n_scale ** p[2]), "alpha": float(p[2]),
                  "B": float(np.exp(p[3]) * d_scale ** p[4]), "beta": float(p[4])}
    fit = LawFit(("E", "A", "alpha", "B", "beta"), _finite("L(N, D) fit", values), rms)
    _bootstrap(fit, lambda drawn: fit_nd(n, d, drawn, start=fit.values, groups=groups), groups, bootstrap, seed,
               loss, residuals(p), needs=ND_INTERVAL_POINTS)
    return fit


# L(N, D) is fitted through P + 1 = 6 points but given an interval from 8 (P + 3). These are simulations, on
# synthetic exact-law sweeps (100 per design, 2 seeds, 0.3% noise), of identified parameters with the truth outside
# their 5-95% interval. At 6 points (one degree of freedom about the law): 57 of 333, 17%
# (benchmarks/results/scaling_nd_coverage.json, `before`), and with sigma known exactly instead of drawn still
# 48 of 342 (scaling_nd_coverage_known_sigma.json there): not the chi2 draw but the percentiles of a fit with one
# point more than parameters. At 7 points, depending on the design: 54 of 342 (16%, 3 sizes x 2 budgets + the
# optimum at a third) and 46 of 386 (12%, 4 sizes x 2 budgets less one) (scaling_nd_coverage_7_points.json there):
# 7 can miss as badly as 6. At 8 points 43 of 393 (the first 7-point design plus one point, same file) and 37 of 394
# (4 x 2, scaling_nd_coverage.json), as at 9-12 (44-50 of ~400): 8 is the fewest at which every design measured
# covered near nominal. L(C) and L*(C) at P + 1 points missed 10-12 of 100, near nominal, and keep P + 1.
ND_INTERVAL_POINTS = 8


# How L(C) and L(N, D) intervals are drawn (`_bootstrap`), in words, for the results files that measure them.
BOOTSTRAP_METHOD = ("parametric bootstrap: every run redrawn about the fitted law with the log-residual scatter of all "
                    "runs (runs - parameters dof, sigma^2 drawn as s^2 dof / chi2(dof) each round), refitted from the "
                    "fit (one start)")


def _bootstrap(fit: LawFit, refit, groups: np.ndarray, rounds: int, seed: int, loss: np.ndarray,
               residuals: np.ndarray, needs: int = 0) -> None:
    """A parametric bootstrap (seeded: the same data give the same intervals). `loss`: every run's loss, `residuals`:
    its log residual (log L_pred - log L) at the fit. Each round redraws every run as the fitted law times
    exp(sigma z), z standard normal, and refits; a round whose refit fails has no value and counts against the
    interval.

    sigma is the scatter of all runs about the law, s^2 = sum(residual^2) / (runs - parameters): on an exact law it
    is the seeds' noise, estimated on every point's seeds at once (the seeds of one point alone give 1 degree of
    freedom with 2 seeds), and where the points lie off the law their scatter about it widens the interval instead
    of being left out. sigma^2 is drawn each round as s^2 dof / chi2(dof) (its spread given s), so that an interval
    resting on few degrees of freedom widens as a t interval does over a normal one. The previous bootstrap drew
    each point's seeds with replacement: with 2 seeds a point's mean took one of 3 values with half the variance of
    the mean, and on exact-law sweeps its "identified" 5-95% intervals missed the truth 30-38% of the time
    (docs/scaling.md). A point run once still gives no interval (`judge`'s "one seed" rule: its noise is not
    measured apart from the law's misfit). `needs`: the fewest points for an interval (`Support.needs`); with fewer
    no round is drawn."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    once = sum(len(m) < 2 for m in members)
    draws: dict[str, list[float]] = {name: [] for name in fit.names}
    if rounds and not once and len(members) >= needs:
        residuals = np.asarray(residuals, float)
        predicted = np.asarray(loss, float) * np.exp(residuals)
        for drawn in parametric_resamples(predicted, residuals, len(fit.names), rounds, seed):
            try:
                refitted = refit(drawn)
            except FitError:
                continue
            for name in fit.names:
                draws[name].append(refitted[name])
    fit.judged = judge(fit.values, draws, Support(len(members), len(fit.names), once, rounds, needs=needs))


def parametric_resamples(predicted: np.ndarray, residuals: np.ndarray, parameters: int, rounds: int,
                         seed: int) -> Iterator[np.ndarray]:
    """`rounds` redraws of every run as `predicted` x exp(sigma z), z standard normal, seeded: the draws of
    `_bootstrap`, shared with the iso-FLOP parabolas (`isoflop`) so that every interval of the report rests on one
    noise model. sigma^2 is s^2 dof / chi2(dof) each round, s^2 = sum(residuals^2) / dof, dof = runs - `parameters`
    (> 0: the caller's rules give every point 2 seeds)."""
    rng = np.random.default_rng(seed)
    dof = len(residuals) - parameters
    scale2 = float(np.sum(np.asarray(residuals, float) ** 2)) / dof
    for _ in range(rounds):
        sigma = np.sqrt(scale2 * dof / rng.chisquare(dof))
        yield predicted * np.exp(sigma * rng.standard_normal(len(predicted)))


def compute_optimal(fit: LawFit, compute: np.ndarray, flops_per_param_image: float,
                    size_exponent: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """N*(C) and D*(C) minimising L(N, D) under C = k N^s D: f(N) = k N^s training FLOPs per image, s =
    `size_exponent` (1: k FLOPs per parameter per image). Setting dL/dN = 0 with D = C / (k N^s) gives
    N*^(alpha + s beta) = alpha A (C / k)^beta / (s beta B)."""
    a, alpha, b, beta = fit["A"], fit["alpha"], fit["B"], fit["beta"]
    s = size_exponent
    scaled = np.asarray(compute, float) / flops_per_param_image  # = N^s D
    n_opt = (alpha * a / (s * beta * b)) ** (1 / (alpha + s * beta)) * scaled ** (beta / (alpha + s * beta))
    return n_opt, scaled / n_opt**s


def extrapolation_error(c: np.ndarray, loss: np.ndarray, holdout: int = 2, groups: np.ndarray | None = None,
                        levels: np.ndarray | None = None, rounds: int = 0, seed: int = 0) -> dict:
    """Fit L(C) without the `holdout` largest compute levels, every seed of them, and predict each of their points'
    mean loss: relative errors. Holding out the largest runs instead held out two seeds of one level and refitted
    with its third (6 levels x 3 seeds: C = 3.2e11 on both sides), which checks no extrapolation. `groups`: the
    point each run measures, as the law was fitted (default: equal C); `levels`: the compute level each run is
    compared at (default: its C; an iso-FLOP design's budget, which its sizes spend to within a step).

    `mean_error` is the held-out points' mean of (predicted - observed) / observed, and `mean_error_5_95` its interval
    over `rounds` parametric rounds: every run redrawn about its point's mean with the seeds' scatter (runs - points
    degrees of freedom, `parametric_resamples`), the held-in levels refitted, the held-out means predicted. An error
    alone ("max 0.6%, mean 0.4%") could not be told from the runs' noise; points run once, or seeds whose losses are
    equal, give no interval."""
    c, loss = np.asarray(c, float), np.asarray(loss, float)
    levels = c if levels is None else np.asarray(levels, float)
    groups = np.unique(c, return_inverse=True)[1].ravel() if groups is None else np.asarray(groups)
    distinct = np.unique(levels)
    if len(distinct) < holdout + 4:
        raise FitError(f"the check needs {holdout + 4} compute levels (4 to fit E + A C^-alpha's 3 parameters, "
                       f"{holdout} to predict), got {len(distinct)}")
    held = levels >= distinct[-holdout]
    fit = fit_compute(c[~held], loss[~held], groups=groups[~held])
    points = np.unique(groups[held])
    at = np.array([c[held & (groups == g)].mean() for g in points])
    observed = np.array([loss[held & (groups == g)].mean() for g in points])
    signed = (compute_law(at, fit["E"], fit["A"], fit["alpha"]) - observed) / observed
    errors = np.abs(signed)
    result = {"max_relative_error": float(errors.max()), "mean_relative_error": float(errors.mean()),
              "held_out_levels": [float(v) for v in distinct[-holdout:]], "held_out_points": len(points),
              "held_out_runs": int(held.sum()), "fitted_levels": len(distinct) - holdout,
              "mean_error": float(signed.mean()), "mean_error_5_95": None, "rounds": 0}
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    if any(len(m) < 2 for m in members):
        result["no_interval"] = "one seed: the seeds' noise is not measured"
        return result
    if not rounds:
        result["no_interval"] = "no bootstrap"
        return result
    means = np.empty_like(loss)
    for m in members:
        means[m] = loss[m].mean()
    scatter = np.log(means) - np.log(loss)
    if not np.any(np.abs(scatter) > 1e-12):  # every round would redraw the same losses: no interval, and not a
        # failed refit (it once said "the refit failed in 0 of 100 resamples")
        result["no_interval"] = "the seeds' losses do not differ: their noise is not measured"
        return result
    drawn_errors = []
    for drawn in parametric_resamples(means, scatter, len(members), rounds, seed):
        try:
            refit = fit_compute(c[~held], drawn[~held], start=fit.values)
        except FitError:
            continue
        seen = np.array([drawn[held & (groups == g)].mean() for g in points])
        drawn_errors.append(float(np.mean((compute_law(at, refit["E"], refit["A"], refit["alpha"]) - seen) / seen)))
    result["rounds"] = len(drawn_errors)
    result["mean_error_5_95"] = bootstrap_interval(drawn_errors, rounds)
    if result["mean_error_5_95"] is None:
        result["no_interval"] = lost_rounds(len(drawn_errors), rounds, "the refit failed")
    return result
