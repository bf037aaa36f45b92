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
start-up is kept for the first step boundary instead of killing the rank; before them, from the rank entry's
first line (cli/__main__.py, before the torch/DeepSpeed/DALI imports), `record_early_stops` keeps it for StopFlag.

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


RANK_COMMANDS = ("pretrain", "finetune", "segment", "eval")
_early_signal: int | None = None
_UNSET = object()
_caller_interrupt: object = _UNSET  # the SIGINT handler a StopFlag replaced, until restore_interrupt puts it back


def record_early_stops(argv: list[str]) -> None:
    """The rank entry's (cli/__main__.py) first act, before the seconds of torch/DeepSpeed/DALI imports that come
    before the loop's StopFlag: SIGUSR1 and SIGTERM are recorded instead of killing the rank (USR1's default
    action) or being lost, and StopFlag adopts what was recorded. Only for the rank commands (`argv`: the
    arguments after the program), so that `python -m mixmae_scale.cli plan` still dies of SIGTERM; a SIGTERM
    ignored by the caller stays ignored (cluster/signal_relay.py's restore_sigterm decides that first). Never on
    import: the package has no side effects."""
    command, words = None, iter(argv)
    for word in words:
        if word in ("--local_rank", "--local-rank"):  # its value follows (the launcher writes --local_rank=N)
            next(words, None)
        elif not word.startswith("-"):
            command = word
            break
    if command not in RANK_COMMANDS:
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _record_early)


def _record_early(signum, frame) -> None:
    global _early_signal
    _early_signal = signum


INTERRUPT_NOTE = (b"mixmae: Ctrl-C: saving a checkpoint at the next step boundary, then exiting; "
                  b"Ctrl-C again to stop at once without it\n")


class StopFlag:
    """The stop request a rank's loop reads once per step.

    Ctrl-C at a terminal sends SIGINT to every process of the foreground group, the ranks included: it raised
    KeyboardInterrupt mid-step and the ranks died without a checkpoint (the work since the last one lost), while
    DeepSpeed's launch.py, which got it too, was sending them the SIGTERM they save on. So the first SIGINT is a stop
    like SIGTERM's, and a second one interrupts at once, the usual way out of a save that takes too long. A caller
    that ignores SIGINT (an in-process sweep's worker, which turns Ctrl-C into a SIGTERM itself) keeps it ignored."""

    def __init__(self) -> None:
        global _early_signal
        self.signal: int | None = None
        self.interrupts = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        global _caller_interrupt
        before = signal.getsignal(signal.SIGINT)
        if before != signal.SIG_IGN:
            # A second flag before the restore keeps the caller's, not the first flag's; a handler the caller set
            # since an earlier flag (one never restored: a loop built by hand) is the caller's now, not the stale one.
            if _caller_interrupt is _UNSET or not isinstance(getattr(before, "__self__", None), StopFlag):
                _caller_interrupt = before
            signal.signal(signal.SIGINT, self._interrupt)
        # A stop that arrived while the process started (record_early_stops), now that this flag's handlers hold:
        # taken once, so that a later run of the same process (an in-process sweep) does not stop by it again.
        if _early_signal is not None and self.signal is None:
            self.signal, _early_signal = _early_signal, None
        self.launchers = _launcher_ancestors(LAUNCHERS)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def _interrupt(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts > 1:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
        if os.environ.get("RANK", "0") == "0":  # once per job, not per rank; os.write: safe in a handler
            os.write(2, INTERRUPT_NOTE)

    def requested(self) -> bool:
        if self.signal is None and any(not _alive(pid, born) for pid, born in self.launchers):
            log.warning("the launcher that started this rank is gone: saving a checkpoint and exiting")
            self.signal = signal.SIGHUP
        return self.signal is not None


def restore_interrupt() -> None:
    """The caller's SIGINT handler back, when the work of a run ends however it ends (engine/runtime.py): a process
    that goes on after the run (pytest, a notebook, `run_rank` alone) kept the run's Ctrl-C stop, which swallowed
    its next Ctrl-C, saying that a checkpoint would be saved with no run left to save one."""
    global _caller_interrupt
    if _caller_interrupt is not _UNSET:
        signal.signal(signal.SIGINT, _caller_interrupt if _caller_interrupt is not None else signal.SIG_DFL)
        _caller_interrupt = _UNSET


def report_stop(checkpoint: Path, step: int, complete: bool = False) -> None:
    """Each node's first rank, after the checkpoint of a requested stop is complete (a collective: on every node).
    `complete`: the run reached its last step (the signal came during it or after it), which the relay says."""
    path = os.environ.get(STOP_REPORT_ENV)
    if path:
        write_text(path, json.dumps({"checkpoint": str(checkpoint), "step": step, "complete": complete}))


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
