"""Weights & Biases as one more sink beside metrics.csv and TensorBoard (`logging.wandb`), rank 0 only.

Researchers follow runs there, so a run logs the same scalars under the same names as TensorBoard
(`Train/loss`, ...; here against the optimizer step, in TensorBoard against images seen), its resolved
configuration, its run record (run.json, as a file and in the summary) and the reconstruction grids. The W&B run
id is kept in the run folder (`wandb.json`), so a resumed run continues the same W&B run instead of starting a
second one. W&B ignores a step below the last it has: steps a resume from an earlier checkpoint trains again keep
their first values there (W&B's rewind, which would replace them, is a private preview); metrics.csv has the new.
In offline mode (`logging.wandb.mode=offline` or WANDB_MODE=offline) the run is written under WANDB_DIR (default: the
run folder) for `wandb sync` later. The package is an optional extra: config/derive.py refuses W&B without it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mixmae_scale.atomic_file import write_text

ID_FILE = "wandb.json"


class WandbSink:
    def __init__(self, run) -> None:
        self.run = run

    @classmethod
    def open(cls, settings, root: Path, name: str, config: dict[str, Any]) -> WandbSink:
        """`settings`: config/schema.py's WandbConfig. Continues the run named in `root/wandb.json` if there is one."""
        import wandb

        id_path = root / ID_FILE
        kept = json.loads(id_path.read_text()) if id_path.exists() else None
        run = wandb.init(project=settings.project, entity=settings.entity, group=settings.group,
                         tags=list(settings.tags) or None, name=name,
                         id=kept["id"] if kept else None, resume="allow",
                         mode=os.environ.get("WANDB_MODE") or settings.mode,
                         dir=os.environ.get("WANDB_DIR") or str(root), config=config)
        if kept is None:
            write_text(id_path, json.dumps({"id": run.id, "project": settings.project, "entity": settings.entity,
                                            "group": settings.group}, indent=2) + "\n")
        return cls(run)

    def log_scalars(self, row: dict[str, Any]) -> None:
        """One metrics.csv row, under TensorBoard's names, at its optimizer step."""
        values = {f"Train/{key}": float(value) for key, value in row.items()
                  if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}
        self.run.log(values, step=int(row["step"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The run's end-of-run numbers (final held-out loss, throughput, MFU) in the W&B run's summary."""
        for key, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.run.summary[f"Summary/{key}"] = value

    def log_record(self, path: Path) -> None:
        """The run record as a file of the W&B run and, for the runs table, in its summary."""
        self.run.summary["run_record"] = json.loads(path.read_text())
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def log_image(key: str, picture, step: int, caption: str) -> None:
    """An image (HWC uint8) in this process's active W&B run, if one is open: visualize/snapshots.py calls this
    without knowing whether W&B is on, and without importing it when it is not."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.log({key: wandb.Image(picture, caption=caption)}, step=step)
