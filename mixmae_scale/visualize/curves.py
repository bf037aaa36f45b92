"""Training curves of one or several runs from their metrics.csv, against steps and images seen."""

from __future__ import annotations

import csv
from pathlib import Path

from mixmae_scale.atomic_file import replacing

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("images_per_s", "images/s"), ("mfu", "MFU"))


def read_metrics(run: str | Path) -> dict[str, list[float]]:
    path = Path(run) / "metrics.csv" if Path(run).is_dir() else Path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path.absolute()}: not found (is {run} a run folder?)")
    columns: dict[str, list[float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                columns.setdefault(key, []).append(float(value) if value not in ("", "None") else float("nan"))
    if not columns.get("step"):
        raise ValueError(f"{path}: no logged steps yet")
    return columns


def plot_runs(runs: list[str], out: str | Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(PANELS), figsize=(4 * len(PANELS), 6.5), squeeze=False)
    for run in runs:
        data = read_metrics(run)
        label = Path(run).name
        for col, (key, title) in enumerate(PANELS):
            if key not in data:
                continue
            for row, x_key in enumerate(("step", "images_seen")):
                axes[row][col].plot(data[x_key], data[key], label=label)
                axes[row][col].set_title(title)
                axes[row][col].set_xlabel("step" if row == 0 else "images seen")
    for row in axes:
        for ax in row:
            if not ax.lines or all(all(v != v for v in line.get_ydata()) for line in ax.lines):
                ax.text(0.5, 0.5, "not logged\n(MFU needs a device peak:\nlogging.peak_tflops)" if ax in
                        (axes[0][-1], axes[1][-1]) else "not logged", ha="center", va="center",
                        transform=ax.transAxes)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with replacing(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return {"runs": list(runs), "out": str(out)}
