"""The signal relay (cluster/signal_relay.py) with stand-ins for DeepSpeed's launcher and the ranks: plain Python
processes, no DeepSpeed, so each case takes about a second. The end-to-end signal tests (test_pretrain.py,
test_faults.py, test_finetune.py) run the real launcher; these pin the relay's own rules:

- SIGTERM or SIGUSR1 to the relay becomes SIGUSR1 to every rank below it, and not to the launcher, which ignores
  SIGUSR1 and SIGTERM (inherited) and would otherwise die of either, even when Slurm signals every process of the
  step and the launcher stand-ins are gone before the second signal;
- the relay exits 0 only when rank 0 reported a saved checkpoint, even where the launcher itself exits 1;
- a rank's failure report is printed after the launcher has said everything, and the exit code stays non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A rank: the relay recognises ranks by `mixmae_scale.cli` on their command line (this one's last argument). The
# failing-rank case needs restore_sigterm: rank 0 ignoring the launcher's SIGTERM would hang it.
RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from mixmae_scale.cluster.signal_relay import restore_sigterm
    restore_sigterm()  # as cli/__main__.py: the launcher below passed on the runner's ignored SIGTERM
    rank, out, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    def stop(signum, frame):
        (out / f"rank{rank}.signal").write_text(signal.Signals(signum).name)
        if rank == 0 and mode != "no-report":
            Path(os.environ["MIXMAE_STOP_REPORT"]).write_text(json.dumps({"checkpoint": "step00000007", "step": 7}))
        sys.exit(0)
    signal.signal(signal.SIGUSR1, stop)
    (out / f"rank{rank}.ready").write_text(str(os.getpid()))
    if mode == "fail" and rank == 1:
        Path(os.environ["MIXMAE_FAILURE_REPORT"]).write_text("mixmae: data.shards=/nowhere: not found\\n")
        sys.exit(1)
    time.sleep(60)
""")

# DeepSpeed's per-node launcher, as far as the relay sees it: it starts the ranks, terminates the others when one
# fails, exits 1 if any failed (or, with `exit1`, always: launch.py after Slurm's SIGTERM), and records whether
# it ignores SIGUSR1.
LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    out, mode, rank_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (out / "launcher.usr1").write_text(str(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN))
    ranks = [subprocess.Popen([sys.executable, rank_file, str(r), str(out), mode, "mixmae_scale.cli"])
             for r in (0, 1)]
    while any(rank.poll() is None for rank in ranks):
        if any(rank.poll() for rank in ranks):
            for rank in ranks:
                rank.terminate()
        time.sleep(0.05)
    codes = [rank.returncode for rank in ranks]
    print("launcher: ranks exited", codes, flush=True)
    sys.exit(1 if mode == "exit1" or any(codes) else 0)
""")


def start_relay(tmp_path: Path, mode: str) -> subprocess.Popen:
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k not in ("MIXMAE_STOP_REPORT", "MIXMAE_FAILURE_REPORT")}
    return subprocess.Popen([sys.executable, "-m", "mixmae_scale.cluster.signal_relay", sys.executable,
                             str(tmp_path / "launcher.py"), str(tmp_path), mode, str(tmp_path / "rank.py")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_ranks(tmp_path: Path, relay: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
        assert relay.poll() is None, relay.communicate()
        assert time.monotonic() < deadline, "the stand-in ranks did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.parametrize("launcher_exit", ["exit0", "exit1"])
def test_a_signal_to_the_relay_reaches_every_rank_as_usr1_and_a_saved_stop_exits_zero(tmp_path, signum,
                                                                                       launcher_exit):
    relay = start_relay(tmp_path, launcher_exit)
    wait_for_ranks(tmp_path, relay)
    relay.send_signal(signum)
    out, err = relay.communicate(timeout=30)
    assert relay.returncode == 0, err
    assert [(tmp_path / f"rank{r}.signal").read_text() for r in (0, 1)] == ["SIGUSR1", "SIGUSR1"]
    assert (tmp_path / "launcher.usr1").read_text() == "True"  # the launcher ignores SIGUSR1: it outlives the stop
    assert f"{signal.Signals(signum).name}: asking 2 ranks to checkpoint and exit" in err
    assert "the ranks saved step00000007 at step 7 and stopped as asked" in err


def test_a_stop_without_rank_zeros_report_is_a_failure(tmp_path):
    """The ranks exited on the signal but none reported a complete checkpoint: a scheduler must not read that as
    a clean stop (it would not requeue), so the relay exits non-zero."""
    relay = start_relay(tmp_path, "no-report")
    wait_for_ranks(tmp_path, relay)
    relay.send_signal(signal.SIGTERM)
    _, err = relay.communicate(timeout=30)
    assert relay.returncode == 1 and "stopped as asked" not in err, err


def test_a_failing_ranks_report_comes_after_the_launchers_last_line_and_the_exit_stays_non_zero(tmp_path):
    """Rank 1 fails with a user's mistake (its one-line report handed to the relay); the launcher ends rank 0 and
    exits 1. The report is the last thing printed, after the launcher's own lines."""
    relay = start_relay(tmp_path, "fail")
    out, err = relay.communicate(timeout=30)
    assert relay.returncode == 1, err
    assert "launcher: ranks exited" in out and not (tmp_path / "rank0.signal").exists()
    assert err.rstrip().endswith("mixmae: data.shards=/nowhere: not found"), err


# Slurm's SIGTERM (time limit, scancel, preemption) goes to every process of the step, not just the relay. Stand-ins
# shaped like DeepSpeed 0.19.8: the runner installs no handler (it dies of SIGTERM unless it inherited SIG_IGN) and
# waits for launch.py; launch.py terminates its ranks on SIGTERM and exits 1; a rank takes a while to save.
STEP_RUNNER = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    out = Path(sys.argv[1])
    launch = subprocess.Popen([sys.executable, str(out / "step_launch.py"), str(out)])
    (out / "runner.pid").write_text(str(__import__("os").getpid()))
    sys.exit(launch.wait())
""")
STEP_LAUNCH = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    ranks = [subprocess.Popen([sys.executable, str(out / "step_rank.py"), str(r), str(out), "mixmae_scale.cli"])
             for r in (0, 1)]
    terminated = []
    def terminate(signum, frame):
        terminated.append(signum)
        for rank in ranks:
            rank.terminate()
    signal.signal(signal.SIGTERM, terminate)
    while any(rank.poll() is None for rank in ranks):
        time.sleep(0.05)
    sys.exit(1 if terminated else 0)
""")
STEP_RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    rank, out = int(sys.argv[1]), Path(sys.argv[2])
    asked = []
    def stop(signum, frame):
        asked.append(signal.Signals(signum).name)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    (out / f"rank{rank}.ready").write_text(str(os.getpid()))
    while not asked:
        time.sleep(0.02)
    time.sleep(1.5)  # the save
    (out / f"rank{rank}.saved").write_text(",".join(asked))
    if rank == 0:
        Path(os.environ["MIXMAE_STOP_REPORT"]).write_text(json.dumps({"checkpoint": "step00000007", "step": 7}))
""")


def start_step(tmp_path: Path) -> subprocess.Popen:
    for name, text in (("step_runner.py", STEP_RUNNER), ("step_launch.py", STEP_LAUNCH), ("step_rank.py", STEP_RANK)):
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("MIXMAE_STOP_REPORT", "MIXMAE_FAILURE_REPORT")}
    relay = subprocess.Popen([sys.executable, "-m", "mixmae_scale.cluster.signal_relay", sys.executable,
                              str(tmp_path / "step_runner.py"), str(tmp_path)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_ranks(tmp_path, relay)
    return relay


def test_slurms_sigterm_to_every_process_of_the_step_still_ends_in_a_saved_stop(tmp_path):
    """Simulated: Slurm would signal the step's processes through its cgroup; here the test sends SIGTERM to the
    runner first (as it happens when the runner is scheduled first), gives it a second to die, then to the relay,
    launch.py and the ranks. A runner that died took launch.py and the ranks out of the relay's tree: it asked 0
    ranks and exited -15 while they were still saving (srun would then kill the step)."""
    import psutil

    relay = start_step(tmp_path)
    runner = psutil.Process(int((tmp_path / "runner.pid").read_text()))
    others = [p for p in psutil.Process(relay.pid).children(recursive=True) if p.pid != runner.pid]
    runner.send_signal(signal.SIGTERM)
    psutil.wait_procs([runner], timeout=1)
    relay.send_signal(signal.SIGTERM)
    for process in others:
        process.send_signal(signal.SIGTERM)
    _, err = relay.communicate(timeout=30)
    assert relay.returncode == 0, err
    assert "SIGTERM: asking 2 ranks to checkpoint and exit" in err
    assert all((tmp_path / f"rank{r}.saved").exists() for r in (0, 1))  # the relay outlived the saves
    assert "the ranks saved step00000007 at step 7 and stopped as asked" in err


def test_a_second_signal_after_the_launcher_exited_is_still_forwarded(tmp_path):
    """USR1 (the warning), then SIGTERM (the time limit) while the ranks save and the launcher stand-ins have
    already gone: the relay's handler used to look for the reaped runner's children and raise."""
    import psutil

    relay = start_step(tmp_path)
    runner = psutil.Process(int((tmp_path / "runner.pid").read_text()))
    launch = [p for p in runner.children() if "step_launch.py" in " ".join(p.cmdline())]
    relay.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    for process in launch + [runner]:  # a launcher that gives up: the ranks, re-parented, are still saving
        process.kill()
    psutil.wait_procs([runner], timeout=5)
    time.sleep(0.2)
    relay.send_signal(signal.SIGTERM)
    _, err = relay.communicate(timeout=30)
    assert relay.returncode == 0 and "Traceback" not in err, err
    assert "SIGTERM: asking 2 ranks" in err
    assert "the ranks saved step00000007 at step 7 and stopped as asked" in err


def test_a_stop_after_the_last_step_is_reported_to_the_relay_as_a_completed_run(tmp_path, monkeypatch):
    """The relay forwards a SIGUSR1 that comes after the last step (Slurm's warning during the final evaluation): the
    ranks ended the run anyway, never reaching a step boundary's stop, and wrote no report, so the relay exited 1 and
    the Slurm step of a completed run read as failed (seen with a tiny 2-rank run under the relay). The loop now
    reports the run's last checkpoint after its summary when a stop was asked and not yet reported."""
    from types import SimpleNamespace

    from mixmae_scale.engine.loop import TrainingLoop

    report = tmp_path / "stop-report.json"
    monkeypatch.setenv("MIXMAE_STOP_REPORT", str(report))
    from mixmae_scale.engine.checkpointing import store

    checkpoint = tmp_path / "checkpoints" / "step00000036"
    checkpoint.mkdir(parents=True)
    store.seal(checkpoint, {"step": 36, "world_size": 2, "kind": "regular"})  # a complete checkpoint, as saved

    def loop(signum, reported=False, local_rank=0):
        return SimpleNamespace(ctx=SimpleNamespace(stop=SimpleNamespace(signal=signum), local_rank=local_rank,
                                                   last_step=36),
                               stop_reported=reported, last_saved=checkpoint, step=36,
                               derived=SimpleNamespace(total_steps=36))

    for quiet in (loop(None), loop(signal.SIGUSR1, reported=True), loop(signal.SIGUSR1, local_rank=1)):
        TrainingLoop._report_a_stop_after_the_last_step(quiet)
        assert not report.exists()
    TrainingLoop._report_a_stop_after_the_last_step(loop(signal.SIGUSR1))
    assert json.loads(report.read_text()) == {"checkpoint": str(checkpoint), "step": 36, "complete": True}
