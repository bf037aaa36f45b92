"""Preemption signals that reach the ranks, whoever the scheduler signals.

DeepSpeed 0.19.8's launchers do not pass a checkpoint request on: the `deepspeed` runner installs no
handler on a local launch (SIGTERM or SIGUSR1 kills it and the ranks train on), and the per-node
`launch.py` answers SIGTERM by terminating the ranks and killing them 30 s later, and dies of SIGUSR1.
Slurm's `--signal=USR1@300` (without `B:`) and `scancel --signal` signal a job step's processes; a
launcher that dies of it ends the step (`srun --kill-on-bad-exit`) before any rank has saved.

`relay(command)` runs the launcher command with SIGUSR1 ignored (the disposition is inherited by the
runner and `launch.py`; the ranks install their own handler), and turns SIGUSR1 or SIGTERM sent to
itself into SIGUSR1 for every rank it started on this node: each rank checkpoints at the next step
boundary and exits 0, so the launcher and the relay exit 0. `mixmae launch` relays; the sbatch script
runs `python -m mixmae_scale.cluster.signal_relay deepspeed ...` on every node. Ranks started by a plain
`deepspeed` command watch their launcher instead (`engine/loop.py`): if it dies, they save and exit.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

import psutil

RANK_MARKERS = ("mixmae_scale.cli",)


def rank_processes(root_pid: int) -> list[psutil.Process]:
    """The training ranks below `root_pid`: python processes running the CLI, not DeepSpeed's launchers."""
    ranks = []
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            line = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if any(m in line for m in RANK_MARKERS) and "deepspeed.launcher" not in line and "/deepspeed " not in line:
            ranks.append(process)
    return ranks


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def relay(command: list[str], env: dict[str, str] | None = None) -> int:
    child = subprocess.Popen(command, env=env, preexec_fn=_ignore_usr1)

    def forward(signum, frame) -> None:
        ranks = rank_processes(child.pid)
        name = signal.Signals(signum).name
        print(f"[mixmae relay] {name}: asking {len(ranks)} rank(s) to checkpoint and exit", file=sys.stderr,
              flush=True)
        for process in ranks:
            with contextlib.suppress(psutil.Error):  # a rank that already exited
                process.send_signal(signal.SIGUSR1)

    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, forward)
    while True:
        try:
            return child.wait()
        except InterruptedError:  # a signal arrived during wait (Python retries by itself since 3.5)
            continue


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m mixmae_scale.cluster.signal_relay LAUNCHER_COMMAND ...", file=sys.stderr)
        return 2
    return relay(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
