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

REQUIRED = ("run_id", "params", "images_seen", "flops", "heldout_loss")


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FitError(f"{path}: no results yet; run `mixmae scaling run` first")
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
    """Indices of the compute-efficient runs: lower loss than every run with less compute."""
    keep, best = [], np.inf
    for i in np.argsort(c):
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


def fit_results(rows: list[dict], bootstrap: int = 200) -> dict:
    c = np.array([r["flops"] for r in rows], float)
    n = np.array([r["params"] for r in rows], float)
    d = np.array([r["images_seen"] for r in rows], float)
    loss = np.array([r["heldout_loss"] for r in rows], float)
    front = frontier(c, loss)
    use = front if len(front) >= 4 else np.arange(len(rows))
    result: dict = {"runs": len(rows), "frontier_runs": [rows[i]["run_id"] for i in front],
                    "compute_fit_on": "frontier" if len(front) >= 4 else "all runs (frontier has < 4 runs)"}
    law_c = fit_compute(c[use], loss[use], bootstrap=bootstrap)
    result["L_of_C"] = {"values": law_c.values, "intervals_5_95": law_c.intervals, "log_rms": law_c.residual_rms}
    if len(use) >= 6:
        result["extrapolation"] = extrapolation_error(c[use], loss[use], holdout=2)
    else:
        result["extrapolation"] = "needs at least 6 runs on the fitted set"
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
    return result


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
    front = frontier(c, loss)
    ax.plot(c[front], loss[front], "k--", lw=1, label="compute frontier")
    grid = np.logspace(np.log10(c.min()), np.log10(c.max()), 100)
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
    else:
        predicted, label = compute_law(c, v["E"], v["A"], v["alpha"]), "L(C) fit"
    ax.scatter(loss, predicted, s=18)
    lims = [min(loss.min(), predicted.min()), max(loss.max(), predicted.max())]
    ax.plot(lims, lims, "k--", lw=1)
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
    lines += ["", "## L(C) = E + A C^-alpha", f"fitted on {fit['compute_fit_on']}", "",
              "| parameter | value | 5-95% bootstrap |", "|---|---|---|"]
    for key, value in fit["L_of_C"]["values"].items():
        low_high = fit["L_of_C"]["intervals_5_95"].get(key)
        ci = f"{low_high[0]:.4g} - {low_high[1]:.4g}" if low_high else "-"
        lines.append(f"| {key} | {value:.4g} | {ci} |")
    extrapolation = fit["extrapolation"]
    if isinstance(extrapolation, dict):
        extrapolation = (f"max relative error {100 * extrapolation['max_relative_error']:.1f}%, mean "
                         f"{100 * extrapolation['mean_relative_error']:.1f}%")
    lines += ["", f"Extrapolation check (fit without the two largest-compute runs, predict them): {extrapolation}",
              "", "## L(N, D) = E + A/N^alpha + B/D^beta", ""]
    if isinstance(fit["L_of_N_D"], dict):
        lines += ["| parameter | value | 5-95% bootstrap |", "|---|---|---|"]
        for key, value in fit["L_of_N_D"]["values"].items():
            low_high = fit["L_of_N_D"]["intervals_5_95"].get(key)
            ci = f"{low_high[0]:.4g} - {low_high[1]:.4g}" if low_high else "-"
            lines.append(f"| {key} | {value:.4g} | {ci} |")
        lines += ["", "Compute-optimal allocation from L(N, D):", "", "| C | N* | D* |", "|---|---|---|"]
        lines += [f"| {p['flops']:.3g} | {p['params']:.3g} | {p['images']:.3g} |" for p in fit["compute_optimal"]]
    else:
        lines.append(fit["L_of_N_D"])
    lines += [""] + [f"![{name}]({name})" for name in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
