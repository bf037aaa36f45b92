"""Preemption signals that reach the ranks, whoever the scheduler signals.

DeepSpeed 0.19.8's launchers do not pass a checkpoint request on: the `deepspeed` runner installs no
handler on a local launch (SIGTERM or SIGUSR1 kills it and the ranks train on), and the per-node
`launch.py` answers SIGTERM by terminating the ranks and killing them 30 s later, and dies of SIGUSR1.
Slurm's `--signal=USR1@300` (without `B:`) and `scancel --signal` signal a job step's processes; a
launcher that dies of it ends the step (`srun --kill-on-bad-exit`) before any rank has saved.

`relay(command)` runs the launcher command with SIGUSR1 and SIGTERM ignored (the dispositions are inherited by
the runner, which installs no handler of its own on a local or --no_ssh launch; `launch.py` installs its own
SIGTERM handler and the ranks both of theirs), and turns SIGUSR1 or SIGTERM sent to itself into SIGUSR1 for every
rank it started on this node: each rank checkpoints at the next step boundary and exits 0, and the relay exits 0
once rank 0 has reported the checkpoint (MIXMAE_STOP_REPORT, engine/preemption.py), even where Slurm's SIGTERM
also reached `launch.py`, which then exits 1. Slurm signals every process of the step at once: a runner that died
of it would leave `launch.py` and the ranks re-parented, out of the relay's process tree, so the relay also finds
its ranks by the stop-report path it put in their environment.
A rank that fails hands its report (one line for a user's mistake) to the relay (MIXMAE_FAILURE_REPORT,
cli/failure_report.py), which prints it after the launcher has exited, so that DeepSpeed's "Killing subprocess"
lines come before the refusal, not after it. `mixmae launch` relays; the sbatch script runs
`python -m mixmae_scale.cluster.signal_relay python -m deepspeed.launcher.runner ...` on every node.
Ranks started by a plain `deepspeed` command watch their launcher instead
(engine/preemption.py): if it dies, they save and exit.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

import psutil

from mixmae_scale.data.errors import plural

RANK_MARKERS = ("mixmae_scale.cli",)
REPORT_ENV = "MIXMAE_FAILURE_REPORT"  # where a failing rank writes its one-line report (cli/failure_report.py)


def rank_processes(root_pid: int, marker: tuple[str, str] | None = None) -> list[psutil.Process]:
    """The training ranks below `root_pid` and, with `marker` (an environment variable and its value), every
    process carrying it, wherever it was re-parented: python processes running the CLI, not DeepSpeed's
    launchers."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):  # a root already gone has no children to ask
        found = {p.pid: p for p in psutil.Process(root_pid).children(recursive=True)}
    if marker is not None:
        for process in psutil.process_iter():
            if process.pid in found:
                continue
            with contextlib.suppress(psutil.Error):  # another user's process, or one that just exited
                if process.environ().get(marker[0]) == marker[1]:
                    found[process.pid] = process
    ranks = []
    for process in found.values():
        try:
            line = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if any(m in line for m in RANK_MARKERS) and "deepspeed.launcher" not in line and "/deepspeed " not in line:
            ranks.append(process)
    return ranks


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def restore_sigterm() -> None:
    """A rank's first act (cli/__main__.py). DeepSpeed's launch.py starts the ranks before it installs its SIGTERM
    handler, so a rank under the relay inherits the runner's ignored SIGTERM: launch.py's own terminate (a rank
    failed at start-up) would then wait 30 s for its SIGKILL. Until the rank's StopFlag takes SIGTERM over, it
    dies of it as any process does. Only under the relay (its stop-report variable is set): elsewhere an ignored
    SIGTERM is the caller's choice (nohup-like wrappers)."""
    import os

    from mixmae_scale.engine.preemption import STOP_REPORT_ENV

    if os.environ.get(STOP_REPORT_ENV) and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def relay(command: list[str], env: dict[str, str] | None = None, shield_sigterm: bool = True) -> int:
    """Run the launcher command; returns its exit status, or 0 after a stop the ranks saved for.
    `shield_sigterm=False` leaves SIGTERM to the launcher: where it starts other hosts (pdsh, mpirun, srun), those
    tools would inherit the ignore and this relay reaches no rank of theirs anyway."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from mixmae_scale.engine.preemption import STOP_REPORT_ENV

    report = Path(tempfile.gettempdir()) / f"mixmae-stop-{os.getpid()}.json"
    failure = Path(tempfile.gettempdir()) / f"mixmae-failure-{os.getpid()}.txt"
    for stale in (report, failure):
        stale.unlink(missing_ok=True)
    child = subprocess.Popen(command, env={**(env if env is not None else os.environ), STOP_REPORT_ENV: str(report),
                                           REPORT_ENV: str(failure)},
                             preexec_fn=_ignore_stop_signals if shield_sigterm else _ignore_usr1)
    asked: list[psutil.Process] = []

    def forward(signum, frame) -> None:
        ranks = rank_processes(os.getpid(), (STOP_REPORT_ENV, str(report)))
        asked.extend(r for r in ranks if r not in asked)
        name = signal.Signals(signum).name
        print(f"[mixmae relay] {name}: asking {plural(len(ranks), 'rank')} to checkpoint and exit", file=sys.stderr,
              flush=True)
        for process in ranks:
            with contextlib.suppress(psutil.Error):  # a rank that already exited
                process.send_signal(signal.SIGUSR1)

    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, forward)
    code = child.wait()  # Python retries the wait itself when a signal interrupts it
    if not asked:
        return _say_failure(failure, code)
    # Slurm's SIGTERM reaches the launchers too: launch.py exits 1 after terminating the ranks (and kills them
    # 30 s later). What counts is whether the ranks saved: wait for them (this process must outlive
    # them, or srun ends the step), then read rank 0's report.
    psutil.wait_procs(asked, timeout=600)
    try:
        saved = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return _say_failure(failure, code) or 1
    finally:
        report.unlink(missing_ok=True)
    done = ("the run reached its last step as the signal came: complete" if saved.get("complete")
            else "stopped as asked")
    print(f"[mixmae relay] the ranks saved {saved['checkpoint']} at step {saved['step']} and {done}",
          file=sys.stderr, flush=True)
    return 0


def _say_failure(failure, code: int) -> int:
    """Prints what a failed rank handed over, now that the launcher has said all it says; the exit code stays
    the launcher's (non-zero: a rank failed)."""
    try:
        text = failure.read_text(errors="replace")
    except OSError:
        return code
    failure.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.write(text)
    sys.stderr.flush()
    return code or 1


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m mixmae_scale.cluster.signal_relay LAUNCHER_COMMAND ...", file=sys.stderr)
        return 2
    return relay(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
