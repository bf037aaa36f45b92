"""The life of one rank's process, from its environment to its exit code, for every command that runs under a
launcher (or alone): `mixmae pretrain`, `finetune`, `eval`. The CLI parses arguments and words the messages;
this module decides what the process does around the work.

- Environment: ranks from Slurm when srun is the launcher (one task per GPU), or a world of one, set up for
  the run and undone after it, when no launcher started the process.
- /dev/shm: each node's first rank removes the DeepSpeed CPU all-reduce buffers a killed run left (RAM until
  reboot); an orderly end removes this run's own (engine/distributed.py).
- The run folder's lock (engine/run_lock.py), taken by the run's start: released when the work ends, however
  it ends, so that the next run of an in-process sweep, in that folder or another, is not refused.
- Exit codes: 0 for a finished run and for one that was already complete, 3 for a non-finite stop (every
  rank stops together, after a collective checkpoint), 2 for an input the command refused (the caller says
  which exceptions those are), 1 for any other failure.
- A failure on one rank of several ends that rank at once with `os._exit(code)`: an orderly shutdown's barrier
  would wait for ranks that are themselves waiting for it, whereas a closed connection makes the launcher stop
  the others (they see the closed connection and stay silent).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mixmae_scale.data.errors import plural
from mixmae_scale.engine import distributed, preemption, run_lock

log = logging.getLogger("mixmae")

# MASTER_PORT 0: the process's own store binds a port the kernel picks, as it binds it. A port probed free and
# handed on could be taken in between by another process of one (a sweep starts eight at once).
WORLD_OF_ONE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
# 2 as the other commands and argparse: the user's input was refused, and running it again as it is fails again.
EXIT_OK, EXIT_FAILED, EXIT_MISTAKE, EXIT_NONFINITE_STOP = 0, 1, 2, 3

# (rank, local rank) -> exit code: the command's work on this rank.
RankWork = Callable[[int, int], int]
# (rank, the exception, alone) -> None: how the command says that the work ended by an exception.
FailureReport = Callable[[int, BaseException, bool], None]


@dataclass(frozen=True)
class RankProcess:
    """Where this process stands: its rank, its node-local rank and whether it runs without a launcher."""

    rank: int
    local_rank: int
    alone: bool

    @property
    def rendezvous(self) -> tuple[str, str]:
        return os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")


def run_rank(work: RankWork, report: FailureReport, default_local_rank: int = 0,
             launcher_ranks: Mapping[str, str] | None = None,
             is_mistake: Callable[[BaseException], bool] = lambda exc: False) -> int:
    """Runs `work` as this process's rank and returns the exit code (or ends the process at once, see the
    module docstring). `default_local_rank`: the launcher's --local_rank argument, where LOCAL_RANK is unset.
    `launcher_ranks`: RANK, WORLD_SIZE, ... as Slurm's srun gives them (cluster/slurm_ranks.py), or None.
    `is_mistake`: whether an exception is the user's mistake (exit 2, which a resubmitting script should not
    retry) rather than a failure (exit 1)."""
    if launcher_ranks:  # one srun task per GPU (launch/slurm/pretrain_srun.sbatch): Slurm is the launcher
        os.environ.update(launcher_ranks)
    alone = "RANK" not in os.environ
    saved_env = {key: os.environ.get(key) for key in WORLD_OF_ONE}
    if alone:
        os.environ.update(WORLD_OF_ONE)
    process = RankProcess(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", default_local_rank)), alone)
    logging.basicConfig(level=logging.INFO if process.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {process.rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(work, report, process, is_mistake)
    finally:
        if alone:
            _restore(saved_env)


def _run(work: RankWork, report: FailureReport, process: RankProcess,
         is_mistake: Callable[[BaseException], bool]) -> int:
    if process.local_rank == 0:
        removed = distributed.remove_stale_shm_buffers()
        if removed:
            log.warning("removed %s a killed run left in /dev/shm: %s",
                        plural(len(removed), "DeepSpeed shared-memory buffer"), ", ".join(removed))
    rendezvous = process.rendezvous
    try:
        try:
            code = work(process.rank, process.local_rank)
        finally:
            run_lock.release_all()
            preemption.restore_interrupt()  # the caller's Ctrl-C back (a process that goes on after the run)
    except Exception as exc:  # noqa: BLE001 - every failure ends this rank now, reported once
        report(process.rank, exc, process.alone)
        code = exit_code(exc, is_mistake(exc))
        if code in (EXIT_FAILED, EXIT_MISTAKE) and not process.alone:
            distributed.remove_shm_buffer(*rendezvous, process.rank)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    distributed.shutdown(*rendezvous)
    return code


def exit_code(exc: BaseException, mistake: bool = False) -> int:
    """The exit code of a rank whose work raised `exc` (`mistake`: the user's). A finished run and a non-finite
    stop are known on every rank (the broadcast resume plan, the all-reduced step decision), so those ranks end in
    order together; a failed rank ends at once."""
    from mixmae_scale.engine.faults import NonFiniteStop
    from mixmae_scale.engine.loop import RunAlreadyComplete

    if isinstance(exc, RunAlreadyComplete):
        return EXIT_OK
    if isinstance(exc, NonFiniteStop):
        return EXIT_NONFINITE_STOP
    return EXIT_MISTAKE if mistake else EXIT_FAILED


def _restore(saved_env: dict[str, str | None]) -> None:
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
