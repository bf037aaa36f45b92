"""The scaling report's matplotlib figures, from results.jsonl's rows and fit.json's laws.

A fit line, an optimum or a prediction is drawn only from a law the fit identified; a figure with nothing to show
is not drawn, and the report says why in its place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixmae_scale.atomic_file import replacing
from mixmae_scale.scaling.fit import compute_law, nd_law
from mixmae_scale.scaling.report import frontier, frontier_compute


def _identified_law(fit: dict, key: str) -> dict | None:
    law = fit[key]
    return law if isinstance(law, dict) and law["identified"] else None


def write_figures(rows: list[dict], fit: dict, out: Path,
                  source: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The figures with data to show, written; those without are not, and an earlier report's copy is removed (it
    would show other results): returns the names written and, per name not drawn, why. `source` (the results file,
    `report.source_line`) is printed under each figure and kept in its PNG text (`Source`), which a copy keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"loss_vs_compute.png": _compute_figure(plt, rows, fit), "loss_vs_params.png": _params_figure(plt, rows)}
    not_drawn: dict[str, str] = {}
    iso = fit.get("iso_flop")
    drawn = ({"iso_flop.png": _iso_flop_figure(plt, rows, iso), "n_opt_vs_compute.png": _n_opt_figure(plt, iso)}
             if isinstance(iso, dict) else {"iso_flop.png": _grid_iso_figure(plt, rows),
                                            "predicted_vs_observed.png": _predicted_figure(plt, rows, fit)})
    if isinstance(iso, dict):
        drawn["predicted_vs_observed.png"] = _predicted_figure(plt, rows, fit)
    for name, figure in drawn.items():
        if isinstance(figure, str):
            not_drawn[name] = figure
        else:
            figures[name] = figure
    for name, figure in figures.items():
        figure.tight_layout()
        if source:  # below the axes; bbox_inches="tight" widens the canvas to hold it
            figure.text(0.01, -0.01, f"data: {source}", fontsize=6, color="0.35", ha="left", va="top")
        with replacing(out / name) as tmp:
            figure.savefig(tmp, dpi=100, format="png", **({"bbox_inches": "tight", "metadata": {"Source": source}}
                                                          if source else {}))
        plt.close(figure)
    for name in not_drawn:
        (out / name).unlink(missing_ok=True)
    return list(figures), not_drawn


def _arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array([r[k] for r in rows], float) for k in ("flops", "params", "images_seen", "heldout_loss"))


def _compute_figure(plt, rows: list[dict], fit: dict):
    c, _, _, loss = _arrays(rows)
    law_c = _identified_law(fit, "L_of_C")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(c, loss, s=18, label="runs")
    front = frontier(frontier_compute(rows), loss)
    ax.plot(c[front], loss[front], "k--", lw=1, label="compute frontier")
    grid = np.logspace(np.log10(c.min()), np.log10(c.max()), 100)
    if law_c:
        v = law_c["values"]
        ax.plot(grid, compute_law(grid, v["E"], v["A"], v["alpha"]), "r",
                label=f"fit: {v['E']:.3f} + A C^-{v['alpha']:.3f}")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out reconstruction loss")
    _title(ax, "loss vs compute", None if law_c else "L(C) is not identified: no fit line")
    ax.legend(fontsize=8)
    return fig


def _loss_vs_size(plt, n: np.ndarray, loss: np.ndarray, groups: list[tuple[np.ndarray, str]], title: str):
    """One line per group of runs, ordered by size: the shape both the data-size and iso-FLOP views share."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for sel, label in groups:
        order = np.argsort(n[sel])
        ax.plot(n[sel][order], loss[sel][order], "o-", label=label)
    ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss", title=title)
    ax.legend(fontsize=7)
    return fig


def _params_figure(plt, rows: list[dict]):
    _, n, d, loss = _arrays(rows)
    groups = [(d == images, f"D = {images:.3g} images") for images in sorted(set(d))]
    return _loss_vs_size(plt, n, loss, groups, "loss vs model size per data size")


def _grid_iso_figure(plt, rows: list[dict]):
    """Runs of a grid that share a compute level (0.1 decade), loss against size; or why there is no curve."""
    c, n, _, loss = _arrays(rows)
    levels = np.round(np.log10(c), 1)
    shared = [b for b in np.unique(levels) if len(np.unique(n[levels == b])) >= 2]
    if not shared:
        return "no two sizes share a compute level (within 0.1 decade): no iso-FLOP curve"
    return _loss_vs_size(plt, n, loss, [(levels == b, f"C ~ 1e{b:.1f}") for b in shared], "iso-FLOP curves")


def _predicted_figure(plt, rows: list[dict], fit: dict):
    c, n, d, loss = _arrays(rows)
    law_c, law_nd = _identified_law(fit, "L_of_C"), _identified_law(fit, "L_of_N_D")
    if law_nd:
        w = law_nd["values"]
        predicted, label = nd_law(n, d, w["E"], w["A"], w["alpha"], w["B"], w["beta"]), "L(N, D) fit"
    elif law_c:
        v = law_c["values"]
        predicted, label = compute_law(c, v["E"], v["A"], v["alpha"]), "L(C) fit"
    else:
        return "neither L(N, D) nor L(C) is identified: nothing to predict with"
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(loss, predicted, s=18)
    lims = [min(loss.min(), predicted.min()), max(loss.max(), predicted.max())]
    ax.plot(lims, lims, "k--", lw=1)
    ax.set(xlabel="observed", ylabel="predicted", title=f"predicted vs observed ({label})")
    return fig


def _title(ax, title: str, note: str | None) -> None:
    """The title, and under it why a fit line is missing."""
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=8 if note else 11)


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
        ax.plot(np.exp(grid), np.polyval(np.polyfit(x, y, 2), grid), "-" if m["interior"] else ":", color=color,
                lw=1)
        if m["interior"]:
            ax.plot(m["n_opt"], m["loss_opt"], "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss (mean, std over seeds)",
           title="iso-FLOP curves: parabola in log N, interior minima starred")
    ax.legend(fontsize=7)
    return fig


def _n_opt_figure(plt, iso: dict):
    """Interior minima with their intervals, the sizes that did best where the minimum is not interior, and the
    N*(C) line only when that law is identified. Without an interior minimum there is no N* at all: a figure of the
    best sizes trained alone, titled N*(C), read as one (the smallest size at every budget of a step-limited pilot),
    so it is not drawn; the iso-FLOP table has those sizes."""
    interior = [m for m in iso["minima"] if m["interior"]]
    edge = [m for m in iso["minima"] if not m["interior"]]
    if not interior:
        return (f"0 of {len(iso['minima'])} budgets have an interior minimum, so no N* exists to plot (the best size "
                "trained at each budget is in the iso-FLOP table)")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    budgets = np.array([m["budget"] for m in interior])
    n_opt = np.array([m["n_opt"] for m in interior])
    low = np.array([m["n_opt_5_95"][0] if m["n_opt_5_95"] else m["n_opt"] for m in interior])
    high = np.array([m["n_opt_5_95"][1] if m["n_opt_5_95"] else m["n_opt"] for m in interior])
    ax.errorbar(budgets, n_opt, yerr=[n_opt - low, high - n_opt], fmt="o", capsize=3,
                label="N*: interior parabola minima (5-95% where seeds allow)")
    if edge:
        ax.plot([m["budget"] for m in edge], [m["best_measured"]["params"] for m in edge], "x", color="0.4",
                label="not N*: best size trained (no interior minimum)")
    law = iso["N_opt"]
    if law["identified"]:
        grid = np.logspace(np.log10(min(law["budgets"])), np.log10(max(law["budgets"])), 20)
        ax.plot(grid, law["coefficient"] * grid ** law["exponent"], "r-", label=f"N* ~ C^{law['exponent']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="parameters N")
    _title(ax, "N*(C): interior minima only", None if law["identified"] else f"{law['verdict']}: no fit line")
    ax.legend(fontsize=8)
    return fig
