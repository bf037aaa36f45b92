"""Approach 2 of Hoffmann et al. (2022): a parabola in log N per compute budget, its vertex, and power laws.

For each budget C the sizes trained on exactly C give held-out losses; a parabola in log N through them
has its vertex at the budget's compute-optimal size N*(C) and loss L*(C) when that vertex is a minimum
inside the sizes trained (interior). Only interior minima are measurements: a vertex outside the sizes
extrapolates a parabola (losses that still fall at the largest size put it near e^(10^15)), so only they
feed the laws across budgets: N*(C) = k_N C^a and D*(C) = k_D C^b, straight lines in log-log, and
L*(C) = E + A C^-alpha. A law through fewer than 3 interior budgets is not fitted (L*(C), with 3
parameters, needs 4): `intervals.too_few_points`, the rule every fit follows. D* is the images a
model of size N* sees on C: C / f(N*), with f (training FLOPs per image) interpolated
in log-log across the family, since a Swin's FLOPs per image are not exactly 6N.

Uncertainty is a seeded parametric bootstrap, the one L(C) and L(N, D) use (`fit.parametric_resamples`): in every
round each run is redrawn about its budget's fitted parabola with the pooled scatter of all runs about their parabolas,
and every parabola and every law is refitted. Only a budget whose every configuration (`fit.configurations`: a run's
settings less its seed) ran at least twice has an interval; a law through a budget with a configuration run once has
none ("one seed"): its noise is not measured apart from the parabola's misfit. A round in which a budget's minimum
leaves the sizes has no value for that budget or for the laws through it; `intervals.judge`, which judges every fit of
the report, says what that and a wide interval mean. The intervals hold the noise, not the parabola's own bias: a
parabola in log N through a law that is not one puts its vertex off the true N* (2-5% on the exact-law sweeps of
benchmarks/scaling_isoflop_coverage.py), and no resampling of the runs moves it. Where the optimum's place among the
sizes drifts with C (the same sizes at every budget) the bias reaches the exponent of N*(C): under 0.012 at our specs'
placements, a small part of its interval (benchmarks/results/scaling_isoflop_placement.json, docs/scaling.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats

from mixmae_scale.scaling.fit import (
    FitError,
    LawFit,
    compute_law,
    configurations,
    fit_compute,
    parametric_resamples,
)
from mixmae_scale.scaling.intervals import (
    MAX_LOST_SHARE,
    Interval,
    Judgement,
    Support,
    bootstrap_interval,
    judge,
    lost_rounds,
    too_few_points,
    verdict,
)

LEFT_THE_SIZES = "the minimum left the sizes"
# How the per-budget N* ranges and the N*(C), D*(C) and L*(C) intervals are drawn, in words, for the results files
# that measure them (benchmarks/scaling_isoflop_coverage.py).
BOOTSTRAP_METHOD = ("parametric bootstrap: every run redrawn about its budget's fitted parabola with the log-residual "
                    "scatter of the runs about their parabolas, pooled over the budgets with an interior minimum and "
                    "at least 2 seeds per configuration (dof: those budgets' runs less 3 per budget for its "
                    "parabola's coefficients; sigma^2 drawn as s^2 dof / chi2(dof) each round), every parabola and "
                    "law refitted; N*(C) and D*(C) exponents spanned with the slope's t interval from the minima's "
                    "scatter about the line")
ONE_SEED_UNIT = ("interior budgets has a size run once", "interior budgets have a size run once")


@dataclass
class BudgetMinimum:
    budget: float
    sizes: int
    seeds: int  # the fewest seeds of any configuration at this budget
    interior: bool  # the vertex lies strictly inside the sizes trained, is a minimum, and the measured best is too
    n_opt: float | None  # the vertex, only when interior
    loss_opt: float | None
    best_n: float  # the size with the lowest mean loss and that loss: what was measured, interior or not
    best_loss: float
    n_interval: Interval | None = None
    loss_interval: Interval | None = None
    missing: str = ""  # why there is no interval


@dataclass
class LineCheck:
    """How far the budgets' minima lie from their power law, against what the runs' noise explains. The bootstrap
    redraws each minimum about its own value and never sees the minima's scatter about the line: three minima, the
    middle one 1.9x off a power law, gave the same exponent interval (0.487-0.499) as three on it."""

    dof: int  # budgets - 2: what the residuals can tell; with 3 budgets, one
    residual_rms: float  # of ln y about the line, on `dof` degrees of freedom
    noise_rms: float | None  # of ln y across the bootstrap's rounds, pooled over budgets; None without one
    interval: Interval  # 5-95%: the slope +- t(0.95, dof) x its standard error from the residuals
    exceeds: bool  # residual_rms beyond what noise_rms explains: above the 95th percentile of chi2(dof) / dof


@dataclass
class PowerLaw:
    """y = coefficient C^exponent through the interior minima, judged by the exponent's interval: the span of the
    bootstrap's interval and the residuals' one (`LineCheck`), so that neither source of error is left out."""

    exponent: float | None  # None: too few interior budgets to fit
    coefficient: float | None
    budgets: list[float]
    judged: Judgement | None = None
    missing: str = ""  # why it was not fitted
    noise_interval: Interval | None = None  # the bootstrap's 5-95% alone
    check: LineCheck | None = None

    @property
    def interval(self) -> Interval | None:
        return self.judged.intervals["exponent"] if self.judged else None

    @property
    def verdict(self) -> str:
        return self.judged.verdicts["exponent"] if self.judged else f"not identified ({self.missing})"

    @property
    def identified(self) -> bool:
        return self.verdict == "identified"


@dataclass
class IsoFlopFit:
    minima: list[BudgetMinimum]
    n_opt: PowerLaw
    d_opt: PowerLaw
    loss_opt: LawFit | str  # L*(C) = E + A C^-alpha, or why it was not fitted
    extrapolation: dict | str  # L*(C) without the largest interior budget, predicting it; or why not
    rounds: int
    left_out: str | None = None  # budgets with fewer than 3 sizes (a sweep cut short), said in the report


def parabola_vertex(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, float, bool]:
    """(log N*, L*, interior) of the least-squares parabola. Interior needs an upward parabola whose vertex lies
    strictly between the smallest and largest size, and a measured minimum (lowest mean loss) at neither
    edge: a parabola through losses that only fall can still bend its vertex just inside the range."""
    a, b, c = np.polyfit(log_n, loss, 2)
    sizes = np.unique(log_n)
    means = np.array([loss[log_n == s].mean() for s in sizes])
    measured_inside = 0 < int(np.argmin(means)) < len(sizes) - 1
    if a <= 0:
        best = int(np.argmin(means))
        return float(sizes[best]), float(means[best]), False
    x = -b / (2 * a)
    return float(x), float(np.polyval([a, b, c], x)), bool(measured_inside and sizes[0] < x < sizes[-1])


def flops_per_image_law(rows: list[dict]) -> tuple[float, float]:
    """(ln k, s) of f(N) = k N^s, the training FLOPs per image fitted in log-log across the family: a Swin's FLOPs
    per image are not exactly proportional to N. The iso-FLOP D* and the report's compute-optimal table both
    account C = f(N) D with it. One size: s = 1."""
    pairs = sorted({(r["params"], r["flops"] / r["images_seen"]) for r in rows})
    log_n = np.log([p for p, _ in pairs])
    log_f = np.log([f for _, f in pairs])
    slope, intercept = np.polyfit(log_n, log_f, 1) if len(pairs) > 1 else (1.0, log_f[0] - log_n[0])
    return float(intercept), float(slope)


def _flops_per_image(rows: list[dict]):
    intercept, slope = flops_per_image_law(rows)
    return lambda n: np.exp(intercept + slope * np.log(n))


def _cells(rows: list[dict]) -> dict[float, dict[int, list[list[float]]]]:
    """Per budget and size, each configuration's losses (its seeds). A size can hold several configurations
    (data fractions at one budget): they are separate points, not seeds of one, and a budget's fewest seeds are
    counted per configuration."""
    groups = configurations(rows)  # refuses one configuration's seed twice
    by_budget: dict[float, dict[int, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for r, g in zip(rows, groups, strict=True):
        by_budget[float(r["budget"])][int(r["params"])].setdefault(int(g), []).append(float(r["heldout_loss"]))
    return {budget: {n: list(configs.values()) for n, configs in sorted(sizes.items())}
            for budget, sizes in sorted(by_budget.items())}


def _losses(configs: list[list[float]]) -> list[float]:
    return [loss for seeds in configs for loss in seeds]


def _vertex(sizes: dict[int, list[list[float]]]) -> tuple[float, float, bool]:
    losses = {n: _losses(configs) for n, configs in sizes.items()}
    log_n = np.concatenate([np.full(len(v), np.log(n)) for n, v in losses.items()])
    return parabola_vertex(log_n, np.concatenate([np.asarray(v, float) for v in losses.values()]))


def _minimum(budget: float, sizes: dict[int, list[list[float]]]) -> BudgetMinimum:
    x, loss_opt, interior = _vertex(sizes)
    means = {n: float(np.mean(_losses(configs))) for n, configs in sizes.items()}
    best = min(means, key=means.__getitem__)
    return BudgetMinimum(budget, len(sizes), min(len(v) for configs in sizes.values() for v in configs), interior,
                         float(np.exp(x)) if interior else None, loss_opt if interior else None, float(best),
                         means[best])


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = k x^a, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(np.exp(intercept))


def _draw_vertices(cells, budgets: list[float], rounds: int, seed: int) -> dict[float, np.ndarray]:
    """Per budget, (rounds, 2) of (log N*, L*) from a parametric bootstrap (`fit.parametric_resamples`, the draws of
    L(C)'s and L(N, D)'s intervals): every run of `budgets` redrawn as its budget's fitted parabola times exp(sigma z),
    sigma^2 the log residuals' sum of squares about the parabolas over the runs of `budgets` less 3 per budget (its
    parabola's coefficients; seeds and the parabolas' misfit pooled over the budgets), and every parabola refitted;
    NaN where the drawn minimum is not interior.
    Drawing each configuration's seeds instead gave, with 2 seeds, a point's mean one of three values with half the
    variance of a mean: the budgets' N* 5-95% ranges missed the vertex of the noiseless parabola 92 times of 300
    (benchmarks/results/scaling_isoflop_coverage.json)."""
    draws = {budget: np.full((rounds, 2), np.nan) for budget in budgets}
    if not budgets or not rounds:
        return draws
    log_n, loss, which = [], [], []
    for budget in budgets:
        for n, configs in cells[budget].items():
            runs = _losses(configs)
            log_n += [np.log(n)] * len(runs)
            loss += runs
            which += [budget] * len(runs)
    log_n, loss, which = np.array(log_n), np.array(loss), np.array(which)
    predicted = np.empty_like(loss)
    for budget in budgets:
        at = which == budget
        predicted[at] = np.polyval(np.polyfit(log_n[at], loss[at], 2), log_n[at])
    # A parabola through the losses of a budget predicts positive losses where it was fitted.
    residuals = np.log(predicted) - np.log(loss)
    for r, drawn in enumerate(parametric_resamples(predicted, residuals, 3 * len(budgets), rounds, seed)):
        for budget in budgets:
            at = which == budget
            x, vertex_loss, interior = parabola_vertex(log_n[at], drawn[at])
            if interior:
                draws[budget][r] = x, vertex_loss
    return draws


def fit_iso_flop(rows: list[dict], bootstrap: int = 1000, seed: int = 0) -> IsoFlopFit:
    """Rows need 'budget' (the planned C), 'params', 'flops', 'images_seen', 'heldout_loss'."""
    cells = _cells(rows)
    # A sweep cut short (a time limit: budgets run from the smallest) leaves its last budget with a size or two:
    # that budget is left out and said, rather than the whole analysis refused.
    thin = [b for b, sizes in cells.items() if len(sizes) < 3]
    left_out = (f"{'budget' if len(thin) == 1 else 'budgets'} {', '.join(f'{b:.3g}' for b in thin)} left out: "
                f"fewer than 3 sizes, and a parabola "
                "needs 3" if thin else None)
    cells = {b: sizes for b, sizes in cells.items() if b not in thin}
    if len(cells) < 2:
        raise FitError(f"an iso-FLOP fit needs at least 2 budgets of 3 or more sizes, got {len(cells)}"
                       + (f" ({left_out})" if left_out else ""))
    minima = [_minimum(budget, sizes) for budget, sizes in cells.items()]
    draws = _draw_vertices(cells, [m.budget for m in minima if m.interior and m.seeds >= 2], bootstrap, seed)
    for m in minima:
        _budget_interval(m, draws.get(m.budget), bootstrap)
    feeding = [m for m in minima if m.interior]
    few = too_few_points("a power law in C", len(feeding), 2)
    if few:
        why = (f"{len(feeding)} of {len(minima)} budgets {'has' if len(feeding) == 1 else 'have'} an interior minimum; "
               "a law needs 3")
        return IsoFlopFit(minima, PowerLaw(None, None, [], missing=why), PowerLaw(None, None, [], missing=why),
                          f"not fitted: {why}", "not run: L*(C) was not fitted", bootstrap, left_out)
    f = _flops_per_image(rows)
    budgets = np.array([m.budget for m in feeding])
    n_opt = np.array([m.n_opt for m in feeding])
    n_law = PowerLaw(*_power_law(budgets, n_opt), [float(b) for b in budgets])
    d_law = PowerLaw(*_power_law(budgets, budgets / f(n_opt)), [float(b) for b in budgets])
    loss_law = _frontier_law(budgets, np.array([m.loss_opt for m in feeding]))
    once = sum(m.seeds < 2 for m in feeding)
    support = Support(len(feeding), 2, once, bootstrap if not once else 0, "a minimum left the sizes", ONE_SEED_UNIT)
    usable = not once and bootstrap
    drawn = np.array([draws[b] for b in budgets]) if usable else None
    _bootstrap_laws(budgets, feeding, drawn, f, n_law, d_law, loss_law, support)
    return IsoFlopFit(minima, n_law, d_law, loss_law, _extrapolation(budgets, feeding, loss_law, drawn), bootstrap,
                      left_out)


def _budget_interval(m: BudgetMinimum, draws: np.ndarray | None, rounds: int) -> None:
    if not m.interior:
        m.missing = "no interior minimum"
    elif m.seeds < 2:
        m.missing = "one seed"
    elif draws is None or not rounds:
        m.missing = "no bootstrap"
    else:
        kept = draws[~np.isnan(draws[:, 0])]
        log_n = bootstrap_interval(kept[:, 0], rounds)
        m.n_interval = (float(np.exp(log_n[0])), float(np.exp(log_n[1]))) if log_n else None
        m.loss_interval = bootstrap_interval(kept[:, 1], rounds)
        enough = len(kept) >= (1 - MAX_LOST_SHARE) * rounds
        m.missing = ("the resamples did not differ" if enough and log_n is None
                     else lost_rounds(len(kept), rounds, LEFT_THE_SIZES))


def _frontier_law(budgets: np.ndarray, losses: np.ndarray) -> LawFit | str:
    if too_few_points("L*(C)", len(budgets), 3):
        return (f"not fitted: L*(C) = E + A C^-alpha has 3 parameters: it needs at least 4 interior budgets, "
                f"got {len(budgets)}")
    try:
        return fit_compute(budgets, losses)
    except FitError as exc:
        return f"not fitted: {exc}"


def _bootstrap_laws(budgets: np.ndarray, feeding: list[BudgetMinimum], draws: np.ndarray | None, f,
                    n_law: PowerLaw, d_law: PowerLaw, loss_law: LawFit | str, support: Support) -> None:
    """`feeding`: the budgets' interior minima; `draws`: (budgets, rounds, 2), or None when there are none to take
    (one seed, no bootstrap). A round counts for a law only when every budget it goes through kept an interior
    minimum (and, for L*(C), the refit converged). All three laws are judged by `judge`; N*(C) and D*(C) also by
    their minima's scatter about the line (`_judge_line`)."""
    n_draws: list[float] = []
    d_draws: list[float] = []
    loss_draws: dict[str, list[float]] = defaultdict(list)
    kept = ~np.isnan(draws[:, :, 0]).any(axis=0) if draws is not None else np.zeros(0, bool)
    for r in np.flatnonzero(kept):
        drawn = np.exp(draws[:, r, 0])
        n_draws.append(_power_law(budgets, drawn)[0])
        d_draws.append(_power_law(budgets, budgets / f(drawn))[0])
        if isinstance(loss_law, LawFit):
            try:
                refit = fit_compute(budgets, draws[:, r, 1], start=loss_law.values)
            except FitError:
                continue
            for name in loss_law.names:
                loss_draws[name].append(refit[name])
    log_c = np.log(budgets)
    n_opt = np.array([m.n_opt for m in feeding])
    log_n = draws[:, kept, 0] if draws is not None else None  # (budgets, kept rounds)
    log_d = log_c[:, None] - np.log(f(np.exp(log_n))) if log_n is not None else None
    for law, values, y, y_draws, label in ((n_law, n_draws, np.log(n_opt), log_n, "ln N*"),
                                           (d_law, d_draws, log_c - np.log(f(n_opt)), log_d, "ln D*")):
        _judge_line(law, values, support, _line_check(log_c, y, y_draws), label)
    if isinstance(loss_law, LawFit):
        loss_support = Support(support.points, 3, support.once, support.rounds,
                               "a minimum left the sizes or the refit failed", support.unit)
        loss_law.judged = judge(loss_law.values, loss_draws, loss_support)


def degrees_of_freedom(dof: int) -> str:
    return f"{dof} degree{'' if dof == 1 else 's'} of freedom"


def _line_check(x: np.ndarray, y: np.ndarray, y_draws: np.ndarray | None) -> LineCheck:
    """y against x = ln C: the residuals' scatter and the slope's t interval from it, and the bootstrap's scatter of
    y (`y_draws`: budgets x rounds), the noise each minimum carries. The bootstrap is parametric, at the runs' full
    variance: the seed bootstrap before it spread a mean of n seeds by (n - 1) / n of its variance and had to be
    scaled back by n / (n - 1)."""
    slope, intercept = np.polyfit(x, y, 1)
    dof = len(x) - 2
    residual = float(np.sqrt(np.sum((y - (slope * x + intercept)) ** 2) / dof))
    half = float(stats.t.ppf(0.95, dof)) * residual / float(np.sqrt(np.sum((x - x.mean()) ** 2)))
    noise = None
    if y_draws is not None and y_draws.shape[1] > 1:
        noise = float(np.sqrt(np.mean(np.var(y_draws, axis=1, ddof=1))))
    exceeds = noise is not None and residual**2 > noise**2 * float(stats.chi2.ppf(0.95, dof)) / dof
    return LineCheck(dof, residual, noise, (float(slope - half), float(slope + half)), bool(exceeds))


def _judge_line(law: PowerLaw, draws: list[float], support: Support, check: LineCheck, label: str) -> None:
    """The exponent's interval spans the bootstrap's and the residuals' (with 3 budgets the residuals' has one degree
    of freedom and is wide: t(0.95, 1) = 6.3); minima that scatter about the line beyond what the runs' noise
    explains are not a power law, whatever the width. Without a bootstrap interval `judge` has said why, and that
    stands."""
    law.judged = judge({"exponent": law.exponent}, {"exponent": draws}, support)
    law.check = check
    noise = law.noise_interval = law.judged.intervals["exponent"]
    if noise is None:
        return
    span = (min(noise[0], check.interval[0]), max(noise[1], check.interval[1]))
    law.judged.intervals["exponent"] = span
    said = law.judged.verdicts["exponent"]
    if check.exceeds:
        law.judged.verdicts["exponent"] = (
            f"not identified (the minima lie off the power law: {check.residual_rms:.2g} rms in {label} about it "
            f"against {check.noise_rms:.2g} from the runs' noise, {degrees_of_freedom(check.dof)})")
    elif "outside its interval" not in said:
        law.judged.verdicts["exponent"] = verdict(span, "", exponent=True)


def _extrapolation(budgets: np.ndarray, feeding: list[BudgetMinimum], law: LawFit | str,
                   draws: np.ndarray | None = None) -> dict | str:
    """L*(C) fitted without the largest interior budget, its L* predicted: run only for an identified L*(C).
    `error` is (predicted - observed) / observed, and `error_5_95` its interval over the bootstrap's rounds
    (`draws`: budgets x rounds x (log N*, L*)), each round's held-in budgets refitted and predicting that round's
    largest minimum: an error alone ("0.4%") could not be told from the runs' noise (0.3% at the median, 0.9% at
    the 90th percentile on exact laws at 0.3% noise: benchmarks/results/scaling_isoflop_placement.json). Like the
    other iso-FLOP intervals it holds the noise, not the parabola's bias."""
    if isinstance(law, str):
        return "not run: L*(C) was not fitted"
    if not law.identified:
        return "not run: L*(C) is not identified"
    if len(budgets) < 5:
        return "not run: needs at least 5 interior budgets (4 to fit, the largest to predict)"
    losses = np.array([m.loss_opt for m in feeding])
    try:
        held_in = fit_compute(budgets[:-1], losses[:-1])
    except FitError as exc:
        return f"not computed: L*(C) without the largest budget: {exc}"
    predicted = float(compute_law(budgets[-1:], held_in["E"], held_in["A"], held_in["alpha"])[0])
    error = (predicted - float(losses[-1])) / float(losses[-1])
    result = {"budget": float(budgets[-1]), "predicted": predicted, "observed": float(losses[-1]),
              "relative_error": abs(error), "error": error, "error_5_95": None, "rounds": 0}
    if draws is None:
        result["no_interval"] = "no bootstrap (one seed, or none asked for)"
        return result
    errors = []
    for r in np.flatnonzero(~np.isnan(draws[:, :, 1]).any(axis=0)):
        try:
            refit = fit_compute(budgets[:-1], draws[:-1, r, 1], start=held_in.values)
        except FitError:
            continue
        guess = float(compute_law(budgets[-1:], refit["E"], refit["A"], refit["alpha"])[0])
        errors.append((guess - draws[-1, r, 1]) / draws[-1, r, 1])
    result["rounds"] = len(errors)
    result["error_5_95"] = bootstrap_interval(np.array(errors), draws.shape[1])
    if result["error_5_95"] is None:
        result["no_interval"] = lost_rounds(len(errors), draws.shape[1], "a minimum left the sizes or the refit failed")
    return result
