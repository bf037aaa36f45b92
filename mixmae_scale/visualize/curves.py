"""Training curves of one or several runs from their metrics.csv, and a fine-tuning run's evaluations (top-1 on
the validation split, from its eval.jsonl) in a panel of their own.

One row of panels. The x axis is the optimizer step, with images seen on a second axis above, when the
runs share a global batch (then the two are one scale, and a second row of panels would repeat the
first); runs with different global batches are compared at equal images seen. A panel no run has data
for (MFU on a CPU, where there is no device peak) is left out and named under the figure, and a run with
a single logged point is drawn as a marker, so that every legend entry has something to point at.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from mixmae_scale.atomic_file import replacing

PANELS = (("loss", "training loss"), ("lr", "learning rate"), ("images_per_s", "images/s"), ("mfu", "MFU"),
          ("eval_top1", "eval top-1 (%)"))
WHY_EMPTY = {"mfu": "MFU (needs a device peak: logging.peak_tflops, or a known GPU)"}
EVAL_KEYS = {"eval_top1": "top1"}  # panel key -> the eval.jsonl field it draws


def read_metrics(run: str | Path) -> dict[str, list[float]]:
    path = Path(run) / "metrics.csv" if Path(run).is_dir() else Path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path.absolute()}: not found (is {run} a run folder?)")
    columns: dict[str, list[float]] = {}
    with path.open() as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            for key, value in row.items():
                try:
                    columns.setdefault(key, []).append(float(value) if value not in ("", "None") else float("nan"))
                except (TypeError, ValueError):
                    raise ValueError(f"{path.absolute()}:{line}: column {key!r} holds {value!r}, "
                                     "not a number") from None
    if not columns.get("step"):
        raise ValueError(f"{path.absolute()}: no logged steps yet")
    return columns


def read_evals(run: str | Path) -> dict[str, list[float]]:
    """A fine-tuning run's evaluations (eval.jsonl beside metrics.csv): step and each EVAL_KEYS value; {} for a
    run that evaluates nothing (pretraining)."""
    path = (Path(run) if Path(run).is_dir() else Path(run).parent) / "eval.jsonl"
    if not path.exists():
        return {}
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        columns = {"step": [float(row["step"]) for row in rows]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path.absolute()}: not one evaluation per line with its step ({exc})") from None
    for key, field in EVAL_KEYS.items():
        columns[key] = [float(row.get(field, math.nan)) for row in rows]
    return columns


def _series(metrics: dict[str, list[float]], evals: dict[str, list[float]], x_key: str,
            key: str) -> tuple[list[float], list[float]]:
    """One panel's points of one run: from metrics.csv, or, for an evaluation, from eval.jsonl at its steps
    (converted to images seen with the run's global batch)."""
    if key not in EVAL_KEYS:
        return _points(metrics, x_key, key)
    xs, ys = _points(evals, "step", key)
    if x_key == "images_seen":
        batch = global_batch(metrics)
        xs = [x * batch for x in xs] if batch else []
        ys = ys if batch else []
    return xs, ys


def _points(data: dict[str, list[float]], x_key: str, key: str) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(data.get(x_key, []), data.get(key, []), strict=False)
             if math.isfinite(x) and math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def global_batch(data: dict[str, list[float]]) -> float | None:
    """Images per step, read off the log (images_seen / step), or None when it is not logged."""
    xs, ys = _points(data, "step", "images_seen")
    return ys[-1] / xs[-1] if xs and xs[-1] else None


def curve_labels(runs: list[str]) -> list[str]:
    """Each run's legend entry: its folder (a metrics.csv given stands for its folder), with as many parent folders
    as it takes to tell the runs apart. Labelled by the last name alone, two metrics.csv files, or `run-1` of two
    sweeps, were one label for two curves."""
    paths = [Path(run).resolve() for run in runs]
    folders = [p.parent if p.suffix in (".csv", ".jsonl") else p for p in paths]
    depth = 1
    while True:
        labels = ["/".join(folder.parts[-depth:]) for folder in folders]
        if len(set(labels)) == len(labels) or all(depth >= len(folder.parts) for folder in folders):
            return labels
        depth += 1


def plot_runs(runs: list[str], out: str | Path) -> dict:
    data = {run: read_metrics(run) for run in runs}  # a wrong folder is said before matplotlib is loaded
    evals = {run: read_evals(run) for run in runs}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = {global_batch(d) for d in data.values()}
    shared_batch = batches.pop() if len(batches) == 1 else None
    x_key = "step" if shared_batch else "images_seen"
    panels = [(key, title) for key, title in PANELS if any(_series(data[r], evals[r], x_key, key)[0] for r in runs)]
    # Only fine-tuning runs evaluate: a pretraining plot without an eval panel is not missing one.
    left_out = [WHY_EMPTY.get(key, title) for key, title in PANELS
                if (key, title) not in panels and key not in EVAL_KEYS]
    if not panels:
        raise ValueError(f"{', '.join(runs)}: no logged values to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    single: list[str] = []
    for (run, metrics), label in zip(data.items(), curve_labels(list(data)), strict=True):
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            xs, ys = _series(metrics, evals[run], x_key, key)
            if len(xs) == 1 and key == panels[0][0]:
                single.append(label)
            # few points: markers, so that a one-row run is visible and not only a legend entry
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 3 else None, markersize=5)
    for ax, (_, title) in zip(axes[0], panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step" if x_key == "step" else "images seen")
        ax.grid(alpha=0.3)
        if shared_batch:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * shared_batch, lambda i: i / shared_batch))
            top.set_xlabel(f"images seen ({shared_batch:g} per step)", fontsize=8)
            top.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=8)
    notes = []
    if left_out:
        notes.append("not plotted, no run logged it: " + "; ".join(left_out))
    if single:
        notes.append(f"one logged point (a marker): {', '.join(single)}")
    if notes:
        fig.text(0.01, 0.01, "   ".join(notes), fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    with replacing(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return {"runs": list(runs), "out": str(out), "x": x_key, "panels": [title for _, title in panels],
            "left_out": left_out}
