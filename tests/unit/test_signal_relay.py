"""The signal relay (cluster/signal_relay.py) with stand-ins for DeepSpeed's launcher and the ranks: plain Python
processes, no DeepSpeed, so each case takes about a second. The end-to-end signal tests (test_pretrain.py,
test_faults.py, test_finetune.py) run the real launcher; these pin the relay's own rules:

- SIGTERM or SIGUSR1 to the relay becomes SIGUSR1 to every rank below it, and not to the launcher, which ignores
  SIGUSR1 (inherited) and would otherwise die of it;
- the relay exits 0 only when rank 0 reported a saved checkpoint, even where the launcher itself exits 1;
- a rank's failure report is printed after the launcher has said everything, and the exit code stays non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A rank: the relay recognises ranks by `mixmae_scale.cli` on their command line (this one's last argument).
RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
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
    assert f"{signal.Signals(signum).name}: asking 2 rank(s) to checkpoint and exit" in err
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
