"""A stop signal that reaches a rank during its start-up, before the training loop's StopFlag exists (the first
seconds: torch, DeepSpeed and DALI imports), is kept for the first step boundary instead of killing the rank
(SIGUSR1's default action, exit 138 under a shell) or being lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The real entry (`python -m mixmae_scale.cli`, as the deepspeed launcher and srun start a rank) with the rank's
# work replaced by its first moments: the signal arrives after the entry started and before the loop's StopFlag
# is made, which must then report the stop (the loop's first step boundary asks it).
CHILD = textwrap.dedent("""
    import os, runpy, signal, sys, time
    from mixmae_scale.cli import job_commands

    def first_moments(args, work):
        os.kill(os.getpid(), {signum})  # as Slurm's --signal=USR1@300 or scancel would, during the imports
        time.sleep(0.2)
        from mixmae_scale.engine.preemption import StopFlag

        flag = StopFlag()
        print("stop requested:", flag.requested(), "signal:", flag.signal, flush=True)
        return 0

    job_commands._as_rank_process = first_moments
    sys.argv = ["mixmae", {command!r}, "--profile", "tiny"]
    runpy.run_module("mixmae_scale.cli", run_name="__main__")
""")


def child(signum: int, command: str = "pretrain") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(signum=int(signum), command=command)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_during_start_up_is_kept_for_the_first_step_boundary(signum):
    result = child(signum)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.strip() == f"stop requested: True signal: {int(signum)}"


def test_importing_the_package_or_the_cli_changes_no_signal_handler():
    """Only the rank entry records early signals: `import mixmae_scale` and the `mixmae` command module do not."""
    code = ("import signal, mixmae_scale, mixmae_scale.cli, mixmae_scale.engine.preemption; "
            "print(signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, signal.getsignal(signal.SIGTERM) is "
            "signal.SIG_DFL)")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True True", result.stderr


def test_only_the_rank_commands_record_early_signals():
    """`python -m mixmae_scale.cli plan` (or --help) must still die of SIGTERM; a caller's ignored SIGTERM stays
    ignored. The handlers of this process are restored afterwards."""
    from mixmae_scale.engine import preemption

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        preemption.record_early_stops(["plan", "swin_b"])
        preemption.record_early_stops(["--help"])
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        preemption.record_early_stops(["--local_rank", "0", "pretrain", "--profile", "tiny"])
        assert signal.getsignal(signal.SIGUSR1) is preemption._record_early
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


CTRL_C = textwrap.dedent("""
    import os, signal, time
    from mixmae_scale.engine.preemption import StopFlag

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's foreground job
    flag = StopFlag()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    print("first:", flag.requested(), flag.signal == signal.SIGINT, flush=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        print("second: not interrupted", flush=True)
    except KeyboardInterrupt:
        print("second: interrupted", flush=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an in-process sweep's worker turns Ctrl-C into SIGTERM itself
    StopFlag()
    print("ignored stays ignored:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)
""")


def test_ctrl_c_at_the_terminal_is_a_stop_with_a_checkpoint_and_a_second_one_interrupts():
    """Ctrl-C reaches the ranks as well as DeepSpeed's launchers: the ranks died of KeyboardInterrupt mid-step, without
    the checkpoint launch.py's SIGTERM asks them for (seen with a tiny 2-rank run: steps since the last save lost)."""
    result = subprocess.run([sys.executable, "-c", CTRL_C], env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0"},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["first: True True", "second: interrupted", "ignored stays ignored: True"], \
        (result.stdout, result.stderr)
    assert "Ctrl-C again to stop at once" in result.stderr


@pytest.mark.parametrize("ends", ["finished", "refused"])
def test_the_callers_ctrl_c_handler_is_back_when_a_run_in_the_process_ends(ends):
    """A run in the caller's process (pytest, a notebook, `run_rank` alone) installs the loop's Ctrl-C stop; after the
    run the caller's own handler must hold again: the flag left behind swallowed the next Ctrl-C (it printed "saving a
    checkpoint at the next step boundary" with no run left to save), however the run ended."""
    from mixmae_scale.engine.preemption import StopFlag
    from mixmae_scale.engine.runtime import run_rank

    def caller_handler(signum, frame):  # what the caller had before the run: must come back, not SIG_DFL
        raise KeyboardInterrupt

    def work(rank, local_rank):
        StopFlag()
        assert signal.getsignal(signal.SIGINT) is not caller_handler  # the run's stop held during the run
        if ends == "refused":
            raise ValueError("a refused start")
        return 0

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, caller_handler)
    try:
        code = run_rank(work, lambda rank, exc, alone: None, is_mistake=lambda exc: True)
        assert code == (0 if ends == "finished" else 2)
        assert signal.getsignal(signal.SIGINT) is caller_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_flag_left_unrestored_by_earlier_work_does_not_bring_back_a_stale_handler():
    """Work that made a StopFlag outside run_rank and never restored (a loop built in the process by hand, an earlier
    test in the same pytest worker) kept the handler it replaced as "the caller's": the next run's restore put that
    stale one back instead of the handler the caller had set since (the Ctrl-C test above failed by the order the
    xdist worker happened to run its modules in)."""
    from mixmae_scale.engine import preemption
    from mixmae_scale.engine.runtime import run_rank

    def stale_handler(signum, frame):
        raise AssertionError("the stale handler")

    def caller_handler(signum, frame):
        raise KeyboardInterrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGINT, stale_handler)
        preemption.StopFlag()  # earlier work: never restored
        signal.signal(signal.SIGINT, caller_handler)
        assert run_rank(lambda rank, local_rank: preemption.StopFlag() and 0, lambda rank, exc, alone: None) == 0
        assert signal.getsignal(signal.SIGINT) is caller_handler
    finally:
        preemption.restore_interrupt()
        for sig, handler in before.items():
            signal.signal(sig, handler)
