"""What a run reports: console lines with progress, a CSV of every logged step, TensorBoard through
DeepSpeed's monitor, and MFU from the analytic FLOPs.
"""

from __future__ import annotations

import csv
import resource
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per device, for MFU when logging.peak_tflops is not set.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def device_peak_flops(configured_tflops: float) -> float | None:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None  # no meaningful peak for a CPU here: set logging.peak_tflops to get MFU
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def model_flops_utilization(images_per_s: float | None, flops_per_image: float | None, peak_flops: float | None,
                            world: int) -> float | None:
    """The share of the `world` devices' peak FLOP/s that the model's own FLOPs use at `images_per_s`; None where
    the job does not count its FLOPs or the device has no known peak (set logging.peak_tflops)."""
    if images_per_s is None or not flops_per_image or not peak_flops:
        return None
    return images_per_s * flops_per_image / (peak_flops * world)


def peak_memory_mib() -> float:
    """Peak since the last `reset_peak_memory()`: allocated GPU memory, or the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, never reset


def reset_peak_memory() -> None:
    """So that the reported peak is the training steps', not the model construction's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


class MetricsLog:
    """Rank 0 only: appends one CSV row per logged step and mirrors it to DeepSpeed's monitor (and W&B)."""

    FIELDS = ("step", "epoch", "images_seen", "loss", "lr", "grad_norm", "images_per_s", "mfu",
              "data_wait_frac", "peak_mem_mib", "elapsed_s", "loss_scale")

    def __init__(self, path: Path, engine_monitor=None, sink=None) -> None:
        self.path = path
        self.monitor = engine_monitor
        self.sink = sink  # engine/wandb_sink.py's WandbSink, or None
        # Empty, not only missing: a process killed before its first row left the header unflushed (0 bytes), and the
        # next launch wrote rows under no header (the first row became the header; a later resume then dropped all).
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.FIELDS)
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: row.get(k) for k in self.FIELDS})
        self._file.flush()
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            events = [(f"Train/{k}", float(v), int(row["images_seen"])) for k, v in row.items()
                      if k not in ("step", "images_seen") and isinstance(v, int | float)]
            self.monitor.write_events(events)
        if self.sink is not None:
            self.sink.log_scalars(row)

    def close(self) -> None:
        self._file.close()


class Throughput:
    """Images/s and the share of wall time spent waiting for data, over the last logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def window(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.images / elapsed, self.data_wait / elapsed


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def logged_learning_rate(path: Path, step: int) -> float | None:
    """The lr a metrics CSV logged at `step`; None where that step has no row (logged every N steps) or no file."""
    if not path.exists():
        return None
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("step") == str(step) and row.get("lr"):
                return float(row["lr"])
    return None


def drop_rows_after(path: Path, step: int) -> int:
    """Resume after a crash: keep the rows of steps up to `step` in a metrics CSV (column `step`) or a
    JSON-lines log (key `step`), so that the steps replayed after the checkpoint are not logged twice.
    Returns how many rows were dropped; the file is rewritten atomically."""
    import json

    from mixmae_scale.atomic_file import write_text

    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    if path.suffix == ".csv":
        header, rows = lines[:1], lines[1:]
        kept = header + [line for line, row in zip(rows, csv.DictReader(lines), strict=True)
                         if row.get("step") and int(row["step"]) <= step]
        dropped = len(lines) - len(kept)
    else:
        kept = [line for line in lines if line.strip() and int(json.loads(line)["step"]) <= step]
        dropped = len(lines) - len(kept)
    if dropped:
        write_text(path, "".join(kept))
    return dropped
