"""How often L(N, D)'s parameters called identified have the true value outside their 5-95% interval, by design: a
simulation on synthetic iso-FLOP sweeps, not a measurement of training. Each sweep puts L = 0.4 + 40/N^0.35 +
300/D^0.25 (an exact law, so only seed noise is left) at 2 seeds and 0.3% noise on sizes about each budget's
optimum, D = C / (6 N); the report's fit (`report.fit_results`) judges it. The question it answers: is 6 points for
L(N, D)'s 5 parameters (one degree of freedom, the `too_few_points` rule's minimum) the reason an interval misses,
so that a higher minimum would fix it? A 5-95% interval that holds the truth should miss it about 10% of the time.
`method` in the results names the interval method measured (the results of the seed-drawing bootstrap it replaced,
148/393 and 127/411 misses, are quoted in docs/scaling.md), `interval_points` the fewest points L(N, D) is given an
interval from (`fit.ND_INTERVAL_POINTS`), `before` the figures under the rule or method before (`--before`).
`--interval-points 6 --known-sigma 0.003` asks whether the chi2 draw of sigma is why P + 1 points miss: the same
sweeps with the true noise instead (`results/scaling_nd_coverage_known_sigma.json`). `--interval-points 7 --designs
4 5 6` asks whether 7 points are enough: two 7-point designs and an 8-point one, no full grids
(`results/scaling_nd_coverage_7_points.json`; one 7-point design missed as the 6-point one did, so the rule is 8).
`command` in the results is the command that wrote them.

    python benchmarks/scaling_nd_coverage.py --sweeps 100 --interval-points 7 --designs 0 1 2 3 [--before OLD.json]
    python benchmarks/scaling_nd_coverage.py --sweeps 100 --interval-points 7 --designs 4 5 6 \
        --out benchmarks/results/scaling_nd_coverage_7_points.json
    python benchmarks/scaling_nd_coverage.py --sweeps 100 --interval-points 6 --known-sigma 0.003 --designs 0 \
        --out benchmarks/results/scaling_nd_coverage_known_sigma.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from mixmae_scale.atomic_file import write_text
from mixmae_scale.scaling import fit
from mixmae_scale.scaling.fit import BOOTSTRAP_METHOD, ND_INTERVAL_POINTS
from mixmae_scale.scaling.report import fit_results

TRUTH = {"E": 0.4, "A": 40.0, "alpha": 0.35, "B": 300.0, "beta": 0.25}
K = 6.0  # training FLOPs per parameter per image
DESIGNS = {  # sizes (as factors of each budget's optimum) x budgets; a design of several such grids is their union
    "3 sizes x 2 budgets (6 points, 1 dof)": ((0.5, 1, 2), (8e9, 1.6e10)),
    "4 sizes x 2 budgets (8 points, 3 dof)": ((0.35, 0.7, 1.4, 2.8), (8e9, 1.6e10)),
    "3 sizes x 3 budgets (9 points, 4 dof)": ((0.5, 1, 2), (8e9, 1.6e10, 3.2e10)),
    "4 sizes x 3 budgets (12 points, 7 dof)": ((0.35, 0.7, 1.4, 2.8), (8e9, 1.6e10, 3.2e10)),
    # 7 points (2 dof), the fewest L(N, D) is given an interval from (`fit.ND_INTERVAL_POINTS`), no full grid:
    "3 sizes x 2 budgets + the optimum at a third (7 points, 2 dof)": (((0.5, 1, 2), (8e9, 1.6e10)),
                                                                        ((1,), (3.2e10,))),
    "4 sizes x 2 budgets less the largest at the larger (7 points, 2 dof)": (((0.35, 0.7, 1.4, 2.8), (8e9,)),
                                                                              ((0.35, 0.7, 1.4), (1.6e10,))),
    # 8 points as the first 7-point design grows: 3 x 3 less the optimum at the largest budget
    "3 sizes x 2 budgets + 2 sizes at a third (8 points, 3 dof)": (((0.5, 1, 2), (8e9, 1.6e10)),
                                                                    ((0.5, 2), (3.2e10,))),
}


def grids(design: tuple) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """A design's grids of (sizes, budgets): one for a full grid, several for a union of them."""
    return [design] if not isinstance(design[0][0], tuple) else list(design)


def points(design: tuple) -> list[tuple[float, list[float]]]:
    """A design's budgets in order, each with its sizes (factors of the budget's optimum)."""
    by_budget: dict[float, list[float]] = {}
    for factors, budgets in grids(design):
        for c in budgets:
            by_budget.setdefault(c, []).extend(factors)
    return list(by_budget.items())


def sweep(design: tuple, seed: int, noise: float = 0.003) -> list[dict]:
    """Runs at every point of `design` (budgets in order, sizes within, 2 seeds each: a full grid draws its noise as
    this benchmark always has)."""
    rng = np.random.default_rng(seed)
    e, a, alpha, b, beta = (TRUTH[k] for k in ("E", "A", "alpha", "B", "beta"))
    rows = []
    for c, factors in points(design):
        n_star = (alpha * a / (beta * b)) ** (1 / (alpha + beta)) * (c / K) ** (beta / (alpha + beta))
        for f in factors:
            n = n_star * f
            d = c / (K * n)
            for s in range(2):
                loss = (e + a / n**alpha + b / d**beta) * (1 + noise * rng.standard_normal())
                rows.append({"run_id": f"{c:g}-{f:g}-{s}", "budget": c, "size": f"f{f:g}", "seed": s,
                             "params": int(n), "flops": c, "images_seen": int(d), "heldout_loss": loss})
    return rows


def _known_sigma(sigma: float):
    """`fit.parametric_resamples` at a fixed sigma: the same draws less the chi2 draw of sigma."""
    def resamples(predicted, residuals, parameters, rounds, seed):
        rng = np.random.default_rng(seed)
        for _ in range(rounds):
            yield predicted * np.exp(sigma * rng.standard_normal(len(predicted)))
    return resamples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling_nd_coverage.json"))
    parser.add_argument("--before", help="a results file of this benchmark under an earlier rule or method: kept in "
                        "the new file under `before`, for the comparison")
    parser.add_argument("--interval-points", type=int, default=ND_INTERVAL_POINTS,
                        help="the fewest points given an interval (the rule's own by default; 6 measures P + 1, "
                             "7 P + 2)")
    parser.add_argument("--known-sigma", type=float,
                        help="draw every resample at this sigma (the true noise) instead of the chi2 draw about the "
                             "residuals' s: whether the draw of sigma is what makes an interval miss")
    parser.add_argument("--designs", type=int, nargs="*", help="indices into DESIGNS (default: all)")
    args = parser.parse_args()
    before = json.loads(Path(args.before).read_text()) if args.before else None
    fit.ND_INTERVAL_POINTS = args.interval_points
    if args.known_sigma is not None:
        fit.parametric_resamples = _known_sigma(args.known_sigma)
    results = []
    chosen = list(DESIGNS.items())
    for name, design in [chosen[i] for i in args.designs] if args.designs else chosen:
        start = time.time()
        fitted = identified = missed = whole = whole_missed = 0
        for i in range(args.sweeps):
            law = fit_results(sweep(design, seed=1000 + i), bootstrap=args.bootstrap, seed=i)["L_of_N_D"]
            if isinstance(law, str):
                continue
            fitted += 1
            misses = [k for k, v in law["verdicts"].items() if v == "identified"
                      and not law["intervals_5_95"][k][0] <= TRUTH[k] <= law["intervals_5_95"][k][1]]
            identified += sum(v == "identified" for v in law["verdicts"].values())
            missed += len(misses)
            whole += law["identified"]
            whole_missed += law["identified"] and bool(misses)
        layout = ({"sizes": list(design[0]), "budgets": list(design[1])} if len(grids(design)) == 1 else
                  {"grids": [{"sizes": list(f), "budgets": list(c)} for f, c in grids(design)]})
        results.append({"design": name, **layout, "sweeps": args.sweeps,
                        "fitted": fitted, "parameters_identified": identified,
                        "identified_with_truth_outside_5_95": missed, "laws_identified": whole,
                        "laws_identified_with_a_parameter_missing_the_truth": whole_missed,
                        "seconds": round(time.time() - start, 1)})
        print(f"{name}: {identified} parameters identified, {missed} with the truth outside; {whole} laws "
              f"identified, {whole_missed} of them missing the truth somewhere", flush=True)
    write_text(args.out, json.dumps({
        "command": shlex.join(["python", *sys.argv]),
        "method": BOOTSTRAP_METHOD + (f"; sigma fixed at {args.known_sigma} instead" if args.known_sigma else ""),
        "interval_points": args.interval_points, "truth": TRUTH, "seeds": 2, "noise": 0.003,
        "bootstrap": args.bootstrap, "results": results,
        **({"before": {key: before.get(key) for key in ("method", "interval_points", "results")}} if before else {})},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
