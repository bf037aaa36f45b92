"""From results.jsonl to fitted laws (fit.json) and a Markdown report with matplotlib figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixmae_scale.scaling.fit import (
    FitError,
    compute_law,
    compute_optimal,
    extrapolation_error,
    fit_compute,
    fit_nd,
    nd_law,
)
from mixmae_scale.scaling.isoflop import IDENTIFIED_FACTOR, fit_frontier_law, fit_iso_flop, identified

REQUIRED = ("run_id", "params", "images_seen", "flops", "heldout_loss")


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FitError(f"{path.absolute()}: not found, no results yet; run `mixmae scaling run` first (or give "
                       "the sweep's --out)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FitError(f"{path}:{number}: not JSON: {exc}") from exc
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise FitError(f"{path}:{number}: run {row.get('run_id', '?')} lacks {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise FitError(f"{path}: empty")
    return rows


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


def _extrapolation(c: np.ndarray, loss: np.ndarray) -> dict | str:
    if len(c) < 6:
        return "needs at least 6 runs on the fitted set"
    try:
        return extrapolation_error(c, loss, holdout=2)
    except FitError as exc:
        return f"not computed: {exc}"


def fit_results(rows: list[dict], bootstrap: int = 200) -> dict:
    c = np.array([r["flops"] for r in rows], float)
    n = np.array([r["params"] for r in rows], float)
    d = np.array([r["images_seen"] for r in rows], float)
    loss = np.array([r["heldout_loss"] for r in rows], float)
    front = frontier(frontier_compute(rows), loss)
    use = front if len(front) >= 4 else np.arange(len(rows))
    result: dict = {"runs": len(rows), "frontier_runs": [rows[i]["run_id"] for i in front],
                    "compute_fit_on": "frontier" if len(front) >= 4 else "all runs (frontier has < 4 runs)"}
    try:
        law_c = fit_compute(c[use], loss[use], bootstrap=bootstrap)
    except FitError as exc:  # e.g. a few budgets whose losses drop too steeply for E + A C^-alpha
        result["L_of_C"] = f"not fitted: {exc}"
        result["extrapolation"] = "not computed: no L(C) fit"
    else:
        result["L_of_C"] = {"values": law_c.values, "intervals_5_95": law_c.intervals, "log_rms": law_c.residual_rms}
        result["extrapolation"] = _extrapolation(c[use], loss[use])
    try:
        law_nd = fit_nd(n, d, loss, bootstrap=bootstrap)
        k = float(np.median(c / (n * d)))  # training FLOPs per parameter per image
        budgets = np.logspace(np.log10(c.min()), np.log10(c.max() * 100), 5)
        n_opt, d_opt = compute_optimal(law_nd, budgets, k)
        result["L_of_N_D"] = {"values": law_nd.values, "intervals_5_95": law_nd.intervals,
                              "log_rms": law_nd.residual_rms}
        result["compute_optimal"] = [{"flops": float(b), "params": float(a), "images": float(i)}
                                     for b, a, i in zip(budgets, n_opt, d_opt, strict=True)]
    except FitError as exc:
        result["L_of_N_D"] = f"not fitted: {exc}"
    if all(r.get("budget") for r in rows):
        result["iso_flop"] = iso_flop_summary(rows, bootstrap)
    return result


def iso_flop_summary(rows: list[dict], bootstrap: int) -> dict | str:
    """Approach 2: per-budget parabola minima, N*(C) and D*(C), and L*(C) through the minima."""
    try:
        fit = fit_iso_flop(rows, bootstrap=max(bootstrap, 200))
    except FitError as exc:
        return f"not fitted: {exc}"
    summary: dict = {
        "minima": [{"budget": m.budget, "n_opt": m.n_opt, "n_opt_5_95": m.n_interval, "loss_opt": m.loss_opt,
                    "loss_opt_5_95": m.loss_interval, "interior": m.interior, "sizes": m.sizes} for m in fit.minima],
        "interior_budgets": sum(m.interior for m in fit.minima),
        "N_opt": {"exponent": fit.n_exponent, "coefficient": fit.n_coefficient,
                  "exponent_5_95": fit.intervals.get("n_exponent"),
                  "identified": identified(fit.intervals.get("n_exponent"))},
        "D_opt": {"exponent": fit.d_exponent, "coefficient": fit.d_coefficient,
                  "exponent_5_95": fit.intervals.get("d_exponent"),
                  "identified": identified(fit.intervals.get("d_exponent"))},
        "identified_factor": IDENTIFIED_FACTOR}
    try:
        law = fit_frontier_law(fit, bootstrap=max(bootstrap, 200))
        law["identified"] = {k: identified(law["intervals_5_95"].get(k)) for k in law["values"]}
        summary["L_opt_of_C"] = law
    except FitError as exc:
        summary["L_opt_of_C"] = f"not fitted: {exc}"
    return summary


def write_report(rows: list[dict], fit: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    c = np.array([r["flops"] for r in rows], float)
    n = np.array([r["params"] for r in rows], float)
    d = np.array([r["images_seen"] for r in rows], float)
    loss = np.array([r["heldout_loss"] for r in rows], float)
    figures = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(c, loss, s=18, label="runs")
    front = frontier(frontier_compute(rows), loss)
    ax.plot(c[front], loss[front], "k--", lw=1, label="compute frontier")
    grid = np.logspace(np.log10(c.min()), np.log10(c.max()), 100)
    if isinstance(fit["L_of_C"], dict):
        v = fit["L_of_C"]["values"]
        ax.plot(grid, compute_law(grid, v["E"], v["A"], v["alpha"]), "r",
                label=f"fit: {v['E']:.3f} + A C^-{v['alpha']:.3f}")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out reconstruction loss", title="loss vs compute")
    ax.legend(fontsize=8)
    figures["loss_vs_compute.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    for images in sorted(set(d)):
        sel = d == images
        order = np.argsort(n[sel])
        ax.plot(n[sel][order], loss[sel][order], "o-", label=f"D = {images:.3g} images")
    ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss", title="loss vs model size per data size")
    ax.legend(fontsize=7)
    figures["loss_vs_params.png"] = fig

    iso = fit.get("iso_flop")
    if isinstance(iso, dict):
        figures["iso_flop.png"] = _iso_flop_figure(plt, rows, iso)
        figures["n_opt_vs_compute.png"] = _n_opt_figure(plt, iso)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.unique(np.round(np.log10(c), 1))
        for b in bins:
            sel = np.round(np.log10(c), 1) == b
            if sel.sum() >= 2:
                order = np.argsort(n[sel])
                ax.plot(n[sel][order], loss[sel][order], "o-", label=f"C ~ 1e{b:.1f}")
        ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss", title="iso-FLOP curves")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no two runs share a compute level", ha="center", transform=ax.transAxes)
        figures["iso_flop.png"] = fig

    fig, ax = plt.subplots(figsize=(5, 5))
    if isinstance(fit["L_of_N_D"], dict):
        w = fit["L_of_N_D"]["values"]
        predicted, label = nd_law(n, d, w["E"], w["A"], w["alpha"], w["B"], w["beta"]), "L(N, D) fit"
    elif isinstance(fit["L_of_C"], dict):
        v = fit["L_of_C"]["values"]
        predicted, label = compute_law(c, v["E"], v["A"], v["alpha"]), "L(C) fit"
    else:
        predicted, label = None, "no law fitted"
    if predicted is not None:
        ax.scatter(loss, predicted, s=18)
        lims = [min(loss.min(), predicted.min()), max(loss.max(), predicted.max())]
        ax.plot(lims, lims, "k--", lw=1)
    else:
        ax.text(0.5, 0.5, "neither L(N, D) nor L(C) could be fitted", ha="center", transform=ax.transAxes)
    ax.set(xlabel="observed", ylabel="predicted", title=f"predicted vs observed ({label})")
    figures["predicted_vs_observed.png"] = fig

    for name, figure in figures.items():
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
    lines = ["# Scaling report", "", f"{len(rows)} runs; held-out reconstruction loss with fixed masks and seed.", "",
             "| run | N | D (images) | C (FLOPs) | held-out loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['run_id']} | {r['params']:,} | {r['images_seen']:,} | {r['flops']:.3g} | {r['heldout_loss']:.4f} |"
              for r in sorted(rows, key=lambda r: r["flops"])]
    if isinstance(iso, dict):
        lines += _iso_flop_section(iso)
    lines += ["", "## L(C) = E + A C^-alpha", f"fitted on {fit['compute_fit_on']}", ""]
    if isinstance(fit["L_of_C"], dict):
        lines += _parameter_table(fit["L_of_C"]["values"], fit["L_of_C"]["intervals_5_95"])
    else:
        lines.append(fit["L_of_C"])
    extrapolation = fit["extrapolation"]
    if isinstance(extrapolation, dict):
        extrapolation = (f"max relative error {100 * extrapolation['max_relative_error']:.1f}%, mean "
                         f"{100 * extrapolation['mean_relative_error']:.1f}%")
    lines += ["", f"Extrapolation check (fit without the two largest-compute runs, predict them): {extrapolation}",
              "", "## L(N, D) = E + A/N^alpha + B/D^beta", ""]
    if isinstance(fit["L_of_N_D"], dict):
        lines += _parameter_table(fit["L_of_N_D"]["values"], fit["L_of_N_D"]["intervals_5_95"])
        lines += ["", "Compute-optimal allocation from L(N, D):", "", "| C | N* | D* |", "|---|---|---|"]
        lines += [f"| {p['flops']:.3g} | {p['params']:.3g} | {p['images']:.3g} |" for p in fit["compute_optimal"]]
    else:
        lines.append(fit["L_of_N_D"])
    lines += [""] + [f"![{name}]({name})" for name in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _parameter_table(values: dict, intervals: dict) -> list[str]:
    """A parameter whose interval is wider than IDENTIFIED_FACTOR is marked, not presented as a finding."""
    lines = ["| parameter | value | 5-95% bootstrap | identified |", "|---|---|---|---|"]
    for key, value in values.items():
        low_high = intervals.get(key)
        ci = f"{low_high[0]:.4g} - {low_high[1]:.4g}" if low_high else "-"
        verdict = "yes" if identified(low_high) else f"**no** (wider than {IDENTIFIED_FACTOR:g}x or not positive)"
        lines.append(f"| {key} | {value:.4g} | {ci} | {verdict} |")
    return lines


def _iso_flop_section(iso: dict) -> list[str]:
    lines = ["", "## Iso-FLOP (approach 2): a parabola in log N per budget", "",
             f"{iso['interior_budgets']} of {len(iso['minima'])} budgets have their minimum inside the sizes trained.",
             "", "| budget C | N* | N* 5-95% | L* | interior |", "|---|---|---|---|---|"]
    for m in iso["minima"]:
        ci = f"{m['n_opt_5_95'][0]:.3g} - {m['n_opt_5_95'][1]:.3g}" if m["n_opt_5_95"] else "-"
        lines.append(f"| {m['budget']:.3g} | {m['n_opt']:.3g} | {ci} | {m['loss_opt']:.4f} | "
                     f"{'yes' if m['interior'] else '**no**'} |")
    for name, label in (("N_opt", "N*(C) = k C^a"), ("D_opt", "D*(C) = k C^b (images)")):
        law = iso[name]
        ci = law["exponent_5_95"]
        text = (f"{law['exponent']:.3f} (5-95%: {ci[0]:.3f} - {ci[1]:.3f})" if ci else
                f"{law['exponent']:.3f} (no interval: a point with one seed has no spread to resample)")
        verdict = "" if law["identified"] else (
            f" -- **not identified** (no interval, or wider than {IDENTIFIED_FACTOR:g}x)")
        lines.append(f"- {label}: exponent {text}, k = {law['coefficient']:.3g}{verdict}")
    frontier_law = iso["L_opt_of_C"]
    lines += ["", "L*(C) = E + A C^-alpha through the budgets' minima:", ""]
    if isinstance(frontier_law, dict):
        lines += _parameter_table(frontier_law["values"], frontier_law["intervals_5_95"])
        ex = frontier_law["extrapolation"]
        lines.append("")
        lines.append(f"Extrapolation (fitted without the largest budget, its L* predicted): {ex}" if isinstance(ex, str)
                     else f"Extrapolation to the largest budget {ex['budget']:.3g}: predicted {ex['predicted']:.4f}, "
                          f"observed {ex['observed']:.4f}, error {100 * ex['relative_error']:.1f}%")
    else:
        lines.append(frontier_law)
    return lines


def _cell_stats(rows: list[dict], budget: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = sorted({r["params"] for r in rows if r.get("budget") == budget})
    means, stds = [], []
    for size in sizes:
        values = [r["heldout_loss"] for r in rows if r.get("budget") == budget and r["params"] == size]
        means.append(np.mean(values))
        stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
    return np.array(sizes, float), np.array(means), np.array(stds)


def _iso_flop_figure(plt, rows: list[dict], iso: dict):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, color in zip(iso["minima"], plt.cm.viridis(np.linspace(0, 0.9, len(iso["minima"]))), strict=True):
        sizes, means, stds = _cell_stats(rows, m["budget"])
        ax.errorbar(sizes, means, yerr=stds, fmt="o", color=color, capsize=3, label=f"C = {m['budget']:.2g}")
        points = [(np.log(r["params"]), r["heldout_loss"]) for r in rows if r.get("budget") == m["budget"]]
        x, y = np.array(points).T
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(np.exp(grid), np.polyval(np.polyfit(x, y, 2), grid), "-", color=color, lw=1)
        ax.plot(m["n_opt"], m["loss_opt"], "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss (mean, std over seeds)",
           title="iso-FLOP curves: parabola in log N, minimum starred")
    ax.legend(fontsize=7)
    return fig


def _n_opt_figure(plt, iso: dict):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    budgets = np.array([m["budget"] for m in iso["minima"]])
    n_opt = np.array([m["n_opt"] for m in iso["minima"]])
    low = np.array([m["n_opt_5_95"][0] if m["n_opt_5_95"] else m["n_opt"] for m in iso["minima"]])
    high = np.array([m["n_opt_5_95"][1] if m["n_opt_5_95"] else m["n_opt"] for m in iso["minima"]])
    ax.errorbar(budgets, n_opt, yerr=[n_opt - low, high - n_opt], fmt="o", capsize=3, label="parabola minima (5-95%)")
    law = iso["N_opt"]
    grid = np.logspace(np.log10(budgets.min()), np.log10(budgets.max()), 20)
    ax.plot(grid, law["coefficient"] * grid ** law["exponent"], "r-", label=f"N* ~ C^{law['exponent']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal N*", title="N*(C)")
    ax.legend(fontsize=8)
    return fig
