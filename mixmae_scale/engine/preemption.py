"""Stopping cleanly when the scheduler asks: a checkpoint at the next step boundary, then exit 0.

Three ways a stop request reaches a rank, all ending in the same flag that the loop reads once per step
(and all-reduces, so every rank stops at the same step):
- SIGTERM or SIGUSR1 to the rank itself: Slurm's time limit and `scancel` signal every process of a job
  step; `srun` per GPU (launch/slurm/pretrain_srun.sbatch) puts the ranks directly under Slurm.
- the relay (cluster/signal_relay.py) passes SIGUSR1/SIGTERM sent to `mixmae launch` or the sbatch script's
  per-node launcher on to the ranks;
- the death of the launcher that started the rank: DeepSpeed's `deepspeed` runner dies of SIGTERM or
  SIGUSR1 without telling the ranks, which would otherwise train on, orphaned.
Handlers are installed before anything slow (process group, data, model), so a signal that arrives during
start-up is kept for the first step boundary instead of killing the rank.

After a stop it saved, each node's first rank writes the checkpoint's path to the file its relay named in
MIXMAE_STOP_REPORT:
DeepSpeed's per-node `launch.py` exits 1 once it has been signalled, and the relay needs to know that the
ranks did what was asked in order to exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

from mixmae_scale.atomic_file import write_text

log = logging.getLogger("mixmae.preemption")

STOP_REPORT_ENV = "MIXMAE_STOP_REPORT"
LAUNCHERS = ("deepspeed", "torchrun", "signal_relay", "mixmae launch")


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        self.launchers = _launcher_ancestors(LAUNCHERS)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self) -> bool:
        if self.signal is None and any(not _alive(pid, born) for pid, born in self.launchers):
            log.warning("the launcher that started this rank is gone: saving a checkpoint and exiting")
            self.signal = signal.SIGHUP
        return self.signal is not None


def report_stop(checkpoint: Path, step: int) -> None:
    """Each node's first rank, after the checkpoint of a requested stop is complete (a collective: on every node)."""
    path = os.environ.get(STOP_REPORT_ENV)
    if path:
        write_text(path, json.dumps({"checkpoint": str(checkpoint), "step": step}))


def _launcher_ancestors(markers: tuple[str, ...], levels: int = 3) -> list[tuple[int, float]]:
    import psutil

    found, process = [], psutil.Process().parent()
    for _ in range(levels):
        if process is None:
            break
        try:
            if any(m in " ".join(process.cmdline()) for m in markers):
                found.append((process.pid, process.create_time()))
            process = process.parent()
        except psutil.Error:
            break
    return found


def _alive(pid: int, born: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return process.create_time() == born and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
