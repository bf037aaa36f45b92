"""How often the iso-FLOP analysis's intervals miss the truth: a simulation on synthetic iso-FLOP sweeps of an exact
L(N, D) = 0.4 + 40/N^0.35 + 300/D^0.25 at D = C / (6 N) (so the true N*(C), D*(C) and L*(C) are known), not a
measurement of training. Per design: budgets over two decades (1e15-1e17), 5 or 7 sizes per budget a factor 2
apart, the window's centre off the true N* by a random factor within 2^+-0.5 per budget (a study does not know N*
in advance), 2 seeds, 0.3% multiplicative noise; `fit_iso_flop` with the report's 200 resamples fits it.

It counts, over the sweeps: the budgets whose N* 5-95% range misses the true N* (and misses the vertex of the
parabola through the noiseless losses, the estimator's own target: the difference is the parabola's bias, not the
interval's width); N*(C)'s and D*(C)'s exponent intervals missing the true exponent (beta / (alpha + beta) and
alpha / (alpha + beta)), over all sweeps and over those the report calls identified; with 4 budgets, L*(C)'s
parameters (true: E = 0.4, alpha = alpha beta / (alpha + beta), A from the law) the same way. A 5-95% interval that
holds the truth should miss it about 1 time in 10. `method` in the results names the interval method measured;
`before`, the method it replaced and its figures on the same sweeps (`--before`: that method's results file).

    python benchmarks/scaling_isoflop_coverage.py --sweeps 100 [--before OLD.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mixmae_scale.atomic_file import write_text
from mixmae_scale.scaling.isoflop import BOOTSTRAP_METHOD, fit_iso_flop, parabola_vertex

E, A, ALPHA, B, BETA = 0.4, 40.0, 0.35, 300.0, 0.25
K = 6.0  # training FLOPs per parameter per image: D = C / (K N)
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))  # N*(C) = G (C / K)^(beta / (alpha + beta))
N_EXPONENT, D_EXPONENT = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
# L*(C) = E + A N*^-alpha + B D*^-beta = E + L_STAR_A C^-gamma, gamma = alpha beta / (alpha + beta)
GAMMA = ALPHA * BETA / (ALPHA + BETA)
L_STAR_A = (A * G**-ALPHA + B * G**BETA) * K**GAMMA
L_STAR = {"E": E, "A": L_STAR_A, "alpha": GAMMA}
DESIGNS = {  # sizes (log2 steps about the window's centre) x budgets
    "3 budgets x 5 sizes": ((-2, -1, 0, 1, 2), (1e15, 1e16, 1e17)),
    "4 budgets x 5 sizes": ((-2, -1, 0, 1, 2), tuple(np.logspace(15, 17, 4))),
    "3 budgets x 7 sizes": ((-3, -2, -1, 0, 1, 2, 3), (1e15, 1e16, 1e17)),
    "4 budgets x 7 sizes": ((-3, -2, -1, 0, 1, 2, 3), tuple(np.logspace(15, 17, 4))),
}


def true_n_opt(c: float) -> float:
    return G * (c / K) ** N_EXPONENT


def law(n: np.ndarray, c: float) -> np.ndarray:
    return E + A / n**ALPHA + B / (c / (K * n)) ** BETA


def sweep(steps: tuple[int, ...], budgets: tuple[float, ...], seed: int, noise: float = 0.003,
          seeds: int = 2) -> tuple[list[dict], dict[float, float]]:
    """The rows, and per budget the vertex of the parabola through its noiseless losses (what the fit estimates)."""
    rng = np.random.default_rng(seed)
    rows, vertices = [], {}
    for c in budgets:
        centre = true_n_opt(c) * 2 ** rng.uniform(-0.5, 0.5)
        sizes = np.array([centre * 2.0**s for s in steps])
        vertices[float(c)] = float(np.exp(parabola_vertex(np.log(sizes.astype(int)), law(sizes, c))[0]))
        for n in sizes:
            for s in range(seeds):
                loss = float(law(n, c) * (1 + noise * rng.standard_normal()))
                rows.append({"run_id": f"{c:.3g}-{int(n)}-{s}", "budget": float(c), "size": f"n{int(n)}", "seed": s,
                             "params": int(n), "flops": float(c), "images_seen": int(c / (K * n)),
                             "heldout_loss": loss})
    return rows, vertices


def _outside(interval, value: float) -> bool:
    return interval is None or not interval[0] <= value <= interval[1]


def measure(steps: tuple[int, ...], budgets: tuple[float, ...], sweeps: int, bootstrap: int) -> dict:
    budget_intervals = budget_missed = budget_missed_vertex = 0
    exponents = {name: {"with_interval": 0, "missed": 0, "identified": 0, "identified_missed": 0}
                 for name in ("N_opt", "D_opt")}
    loss_law = {name: {"with_interval": 0, "missed": 0, "identified": 0, "identified_missed": 0} for name in L_STAR}
    for i in range(sweeps):
        rows, vertices = sweep(steps, budgets, seed=5000 + i)
        fit = fit_iso_flop(rows, bootstrap=bootstrap, seed=i)
        for m in fit.minima:
            if m.n_interval is not None:
                budget_intervals += 1
                budget_missed += _outside(m.n_interval, true_n_opt(m.budget))
                budget_missed_vertex += _outside(m.n_interval, vertices[m.budget])
        for name, power, truth in (("N_opt", fit.n_opt, N_EXPONENT), ("D_opt", fit.d_opt, D_EXPONENT)):
            if power.interval is None:
                continue
            counts = exponents[name]
            miss = _outside(power.interval, truth)
            counts["with_interval"] += 1
            counts["missed"] += miss
            counts["identified"] += power.identified
            counts["identified_missed"] += power.identified and miss
        if not isinstance(fit.loss_opt, str):
            verdicts = fit.loss_opt.verdicts()
            for name, truth in L_STAR.items():
                interval = fit.loss_opt.intervals.get(name)
                if interval is None:
                    continue
                counts = loss_law[name]
                miss = _outside(interval, truth)
                counts["with_interval"] += 1
                counts["missed"] += miss
                counts["identified"] += verdicts[name] == "identified"
                counts["identified_missed"] += verdicts[name] == "identified" and miss
    return {"budget_n_opt": {"with_interval": budget_intervals, "true_n_opt_outside_5_95": budget_missed,
                             "noiseless_vertex_outside_5_95": budget_missed_vertex},
            "exponents": exponents, **({"L_opt_of_C": loss_law} if len(budgets) >= 4 else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling_isoflop_coverage.json"))
    parser.add_argument("--before", help="a results file of this benchmark under an earlier method: its method and "
                        "results are kept in the new file under `before`, for the comparison")
    args = parser.parse_args()
    before = json.loads(Path(args.before).read_text()) if args.before else None
    results = []
    print("| design | budgets' N* missing truth (vertex) | N*(C) exp. missed, identified (missed) | "
          "D*(C) exp. missed, identified (missed) | L*(C) E, A, alpha missed |")
    print("|---|---|---|---|---|")
    for name, (steps, budgets) in DESIGNS.items():
        start = time.time()
        result = measure(steps, budgets, args.sweeps, args.bootstrap)
        result.update({"design": name, "size_steps_log2": list(steps), "budgets": [float(b) for b in budgets],
                       "sweeps": args.sweeps, "seconds": round(time.time() - start, 1)})
        results.append(result)
        per = result["budget_n_opt"]
        n, d = result["exponents"]["N_opt"], result["exponents"]["D_opt"]
        star = result.get("L_opt_of_C")
        stars = (", ".join(f"{v['missed']}/{v['with_interval']}" for v in star.values()) if star else "not fitted")
        print(f"| {name} | {per['true_n_opt_outside_5_95']}/{per['with_interval']} "
              f"({per['noiseless_vertex_outside_5_95']}) | {n['missed']}/{n['with_interval']}, {n['identified']} "
              f"({n['identified_missed']}) | {d['missed']}/{d['with_interval']}, {d['identified']} "
              f"({d['identified_missed']}) | {stars} |", flush=True)
    write_text(args.out, json.dumps({
        "method": BOOTSTRAP_METHOD, "truth": {"E": E, "A": A, "alpha": ALPHA, "B": B, "beta": BETA, "K": K,
                                              "N_opt_exponent": N_EXPONENT, "D_opt_exponent": D_EXPONENT,
                                              "L_opt_of_C": L_STAR},
        "seeds": 2, "noise": 0.003, "bootstrap": args.bootstrap, "results": results,
        **({"before": {key: before[key] for key in ("method", "bootstrap", "results")}} if before else {})},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
