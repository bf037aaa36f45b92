"""Approach 2 of Hoffmann et al. (2022): a parabola in log N per compute budget, its vertex, and power laws.

For each budget C the sizes trained on exactly C give held-out losses; a parabola in log N through them
has its vertex at the budget's compute-optimal size N*(C) and loss L*(C). Across budgets,
N*(C) = k_N C^a and D*(C) = k_D C^b are straight lines in log-log. D* is the images a model of size N*
sees on C: C / f(N*), with f (training FLOPs per image) interpolated in log-log across the family, since a
Swin's FLOPs per image are not exactly 6N.

Uncertainty is a bootstrap over runs: in every round each (budget, size) cell draws its seeds with
replacement, every parabola and every law is refitted. A parameter whose 5-95% interval is wider than a
stated factor is reported as not identified, not as a finding.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from mixmae_scale.scaling.fit import FitError, compute_law, fit_compute

IDENTIFIED_FACTOR = 3.0  # a 5-95% interval wider than this factor (hi / lo) is "not identified"


@dataclass
class BudgetMinimum:
    budget: float
    n_opt: float
    loss_opt: float
    interior: bool  # the vertex lies strictly inside the sizes trained at this budget, and is a minimum
    sizes: int
    n_interval: tuple[float, float] | None = None
    loss_interval: tuple[float, float] | None = None


@dataclass
class IsoFlopFit:
    minima: list[BudgetMinimum]
    n_exponent: float
    n_coefficient: float
    d_exponent: float
    d_coefficient: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap_rounds_used: int = 0


def identified(interval: tuple[float, float] | None, factor: float = IDENTIFIED_FACTOR) -> bool:
    """A positive interval no wider than `factor`; an interval that reaches zero or below is not identified."""
    if interval is None:
        return False
    low, high = interval
    return low > 0 and high / low <= factor


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


def _flops_per_image(rows: list[dict]):
    """log f(N) interpolated linearly in log N across the family (f: training FLOPs per image)."""
    pairs = sorted({(r["params"], r["flops"] / r["images_seen"]) for r in rows})
    log_n = np.log([p for p, _ in pairs])
    log_f = np.log([f for _, f in pairs])
    slope, intercept = np.polyfit(log_n, log_f, 1) if len(pairs) > 1 else (1.0, log_f[0] - log_n[0])
    return lambda n: np.exp(intercept + slope * np.log(n))


def _cells(rows: list[dict]) -> dict[float, dict[int, list[float]]]:
    by_budget: dict[float, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_budget[float(r["budget"])][int(r["params"])].append(float(r["heldout_loss"]))
    return by_budget


def _minima(cells: dict[float, dict[int, list[float]]]) -> list[BudgetMinimum]:
    minima = []
    for budget in sorted(cells):
        sizes = cells[budget]
        log_n = np.concatenate([np.full(len(v), np.log(n)) for n, v in sizes.items()])
        loss = np.concatenate([np.asarray(v, float) for v in sizes.values()])
        x, l_opt, interior = parabola_vertex(log_n, loss)
        minima.append(BudgetMinimum(budget, float(np.exp(x)), l_opt, interior, len(sizes)))
    return minima


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = k x^a, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(np.exp(intercept))


def fit_iso_flop(rows: list[dict], bootstrap: int = 1000, seed: int = 0) -> IsoFlopFit:
    """Rows need 'budget' (the planned C), 'params', 'flops', 'images_seen', 'heldout_loss'."""
    cells = _cells(rows)
    if len(cells) < 2:
        raise FitError(f"an iso-FLOP fit needs at least 2 budgets, got {len(cells)}")
    thin = [b for b, sizes in cells.items() if len(sizes) < 3]
    if thin:
        raise FitError(f"budget(s) {', '.join(f'{b:.3g}' for b in thin)} have fewer than 3 sizes: a parabola "
                       "needs 3")
    f = _flops_per_image(rows)
    minima = _minima(cells)
    budgets = np.array([m.budget for m in minima])
    n_opt = np.array([m.n_opt for m in minima])
    a_n, k_n = _power_law(budgets, n_opt)
    a_d, k_d = _power_law(budgets, budgets / f(n_opt))
    fit = IsoFlopFit(minima, a_n, k_n, a_d, k_d)
    if bootstrap and all(len(v) >= 2 for sizes in cells.values() for v in sizes.values()):
        _bootstrap(fit, cells, f, bootstrap, seed)  # one seed per cell has no spread to resample: no intervals
    return fit


def _bootstrap(fit: IsoFlopFit, cells, f, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    per_budget: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for _ in range(rounds):
        drawn = {b: {n: list(rng.choice(v, size=len(v), replace=True)) for n, v in sizes.items()}
                 for b, sizes in cells.items()}
        minima = _minima(drawn)
        for m in minima:
            per_budget[m.budget].append((m.n_opt, m.loss_opt))
        budgets = np.array([m.budget for m in minima])
        n_opt = np.array([m.n_opt for m in minima])
        samples["n_exponent"].append(_power_law(budgets, n_opt)[0])
        samples["d_exponent"].append(_power_law(budgets, budgets / f(n_opt))[0])
        fit.bootstrap_rounds_used += 1
    fit.intervals = {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) for k, v in samples.items()}
    for m in fit.minima:
        draws = np.array(per_budget[m.budget])
        m.n_interval = (float(np.percentile(draws[:, 0], 5)), float(np.percentile(draws[:, 0], 95)))
        m.loss_interval = (float(np.percentile(draws[:, 1], 5)), float(np.percentile(draws[:, 1], 95)))


def fit_frontier_law(fit: IsoFlopFit, bootstrap: int = 1000, seed: int = 0) -> dict:
    """L*(C) = E + A C^-alpha through the budgets' parabola minima, the intervals from refitting it to minima
    drawn within their own bootstrap intervals (normal, matching each 5-95% width), and an extrapolation
    check: fitted without the largest budget, its L* predicted."""
    budgets = np.array([m.budget for m in fit.minima])
    losses = np.array([m.loss_opt for m in fit.minima])
    if len(budgets) < 4:
        raise FitError(f"L*(C) = E + A C^-alpha has 3 parameters: it needs at least 4 budgets, got {len(budgets)}")
    law = fit_compute(budgets, losses)
    spreads = np.array([(m.loss_interval[1] - m.loss_interval[0]) / 3.29 if m.loss_interval else 0.0
                        for m in fit.minima])  # 5-95% of a normal spans 3.29 standard deviations
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(bootstrap):
        try:
            refit = fit_compute(budgets, np.maximum(losses + rng.normal(0, spreads), 1e-6))
        except FitError:
            continue
        for name in law.names:
            draws[name].append(refit[name])
    intervals = {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) for k, v in draws.items() if v}
    held_in = fit_compute(budgets[:-1], losses[:-1]) if len(budgets) >= 5 else None
    result = {"values": law.values, "intervals_5_95": intervals, "log_rms": law.residual_rms}
    if held_in is not None:
        predicted = float(compute_law(budgets[-1:], held_in["E"], held_in["A"], held_in["alpha"])[0])
        result["extrapolation"] = {"budget": float(budgets[-1]), "predicted": predicted, "observed": float(losses[-1]),
                                   "relative_error": abs(predicted - losses[-1]) / losses[-1]}
    else:
        result["extrapolation"] = "needs at least 5 budgets (4 to fit, the largest to predict)"
    return result
