"""A pool worker that dies (the kernel's out-of-memory killer sends SIGKILL) is said in one line naming the signal,
what was kept and `--workers`, not with a traceback or the main-guard advice meant for a user's own script; and a
conversion stopped that way resumes when the same command runs again (shards/builder.py, cli/shard_commands.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from mixmae_scale.shards.builder import PoolError, bounded_pool

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).resolve().parents[2]


def die_on_two(unit: int) -> int:
    if unit == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return unit


def test_a_worker_killed_by_sigkill_is_named_with_its_signal_and_the_likely_cause():
    with pytest.raises(PoolError) as caught:
        list(bounded_pool(die_on_two, [1, 2, 3], workers=2))
    assert caught.value.exitcode == -signal.SIGKILL and caught.value.workers == 2
    assert "SIGKILL" in str(caught.value) and "out of memory" in str(caught.value)


def exit_on_two(unit: int) -> int:
    if unit == 2:
        os._exit(3)
    return unit


def test_a_worker_that_exited_with_a_code_is_not_said_to_have_been_killed():
    """A worker that exits (a user's code calling os._exit, an unguarded script's exit 1) was 'exited with code 3
    ... otherwise it was killed (out of memory?)', which contradicts itself."""
    with pytest.raises(PoolError) as caught:
        list(bounded_pool(exit_on_two, [1, 2, 3], workers=2))
    said = str(caught.value)
    assert caught.value.exitcode == 3 and "exited with code 3" in said
    assert "killed" not in said and "workers=1" in said


def test_a_dead_worker_is_a_one_line_failure_not_a_refused_input():
    """Exit 1 under a launcher too (cli/failure_report.py): the same command may pass once memory is free."""
    from mixmae_scale.cli.failure_report import is_refused_input, is_user_mistake

    died = PoolError("a worker of the pool (2 workers) was killed by SIGKILL", workers=2, exitcode=-9)
    assert is_user_mistake(died) and not is_refused_input(died)


def test_convert_with_a_worker_killed_says_one_line_and_the_same_command_resumes(tmp_path, monkeypatch, capfd):
    from mixmae_scale.cli import main
    from mixmae_scale.shards.demo import build_demo_images
    from mixmae_scale.shards.verify import verify

    build_demo_images(tmp_path / "images", train_per_class=3, val_per_class=1, seed=0)  # 30 train, 10 val images
    out = tmp_path / "out"
    command = ["shards", "imagenet", "--src", str(tmp_path / "images"), "--out", str(out), "--samples-per-shard", "4",
               "--workers", "2"]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HELPERS), str(ROOT)]))  # the workers load the hook
    monkeypatch.setenv("MIXMAE_TEST_KILL_SHARD", "train-000002")  # taken once a worker finished shard 0 or 1
    assert main(command) == 1
    err = capfd.readouterr().err
    said = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("mixmae")]
    assert "Traceback" not in err and len(said) == 1, err[-3000:]
    assert said[0].startswith("mixmae: error: a worker process (of 2) was killed by SIGKILL"), said
    for words in ("out of memory", "kept", "same command", "--workers 1"):
        assert words in said[0], said
    assert "__main__" not in said[0] and not (out / "dataset.json").exists()

    monkeypatch.delenv("MIXMAE_TEST_KILL_SHARD")
    assert main(command) == 0
    assert "done earlier" in capfd.readouterr().err
    counts = json.loads((out / "dataset.json").read_text())["splits"]
    assert {split: (entry["samples"], entry["found"], entry["rejected"])
            for split, entry in counts.items()} == {"train": (30, 30, 0), "val": (10, 10, 0)}
    assert not list(out.glob("*.tmp*")) and verify(out)["ok"]


def test_verify_with_a_worker_killed_says_one_line_and_that_the_set_was_only_read(demo_shards, monkeypatch, capfd):
    from mixmae_scale.cli import main

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HELPERS), str(ROOT)]))
    monkeypatch.setenv("MIXMAE_TEST_KILL_TAR", "train-000001.tar")
    assert main(["shards", "verify", str(demo_shards), "--workers", "2"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("mixmae: error: a worker process (of 2) was killed by SIGKILL") and \
        "the set was only read, so the same command can run again" in err and "--workers 1" in err, err


def test_a_worker_that_crashed_is_not_told_to_lower_workers_for_memory(capsys):
    """A worker ended by SIGSEGV (a native decoder's crash) is no out-of-memory kill: the library says `workers=1`
    does the work in this process, where what ends it shows; the command line said 'if memory ran out, lower
    --workers (e.g. --workers 2)', and fewer workers crash the same way."""
    from mixmae_scale.cli.shard_commands import _worker_died

    crashed = PoolError("a worker of the pool (4 workers) was killed by SIGSEGV", workers=4,
                        exitcode=-signal.SIGSEGV)
    assert _worker_died(crashed, "the shards written so far are kept") == 1
    said = capsys.readouterr().err
    assert said.startswith("mixmae: error: a worker process (of 4) was killed by SIGSEGV") and said.count("\n") == 1
    assert "memory" not in said and "--workers 1 does the work in this process, where what ends it shows" in said
    # A worker that exited with a code (not a signal) keeps the hedged advice.
    assert _worker_died(PoolError("", workers=4, exitcode=1), "kept") == 1
    assert "if memory ran out, lower --workers (e.g. --workers 2)" in capsys.readouterr().err


ORPHAN_SCRIPT = """
import os, signal, sys, time
from mixmae_scale.shards.builder import bounded_pool

def work(unit, folder):
    with open(os.path.join(folder, f"worker-{os.getpid()}"), "a") as seen:
        seen.write(f"{unit}\\n")
    time.sleep(0.3)
    return unit

if __name__ == "__main__":
    for _ in bounded_pool(work, list(range(40)), 2, (sys.argv[1],)):
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))  # `kill PID`, or the OOM killer choosing the main process
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaps, as under a container's init, has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_the_pool_workers_end_with_the_process_that_started_them(tmp_path, signal_name):
    """`kill PID` (or the OOM killer) ended `mixmae shards` but not its pool workers: they went on writing the shards
    already handed to them into the output after the command had exited (racing a rerun started at once on the same
    temporary files), then sat idle for good as orphans. Seen here: 3 processes left, files still appearing."""
    import subprocess
    import sys
    import time

    script = tmp_path / "pooled.py"
    script.write_text(ORPHAN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ended = subprocess.run([sys.executable, str(script), str(tmp_path), signal_name], env=env, timeout=60)
    assert ended.returncode == -getattr(signal, signal_name)
    workers = [int(path.name.split("-")[1]) for path in tmp_path.glob("worker-*")]
    assert workers, "no worker started"
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # the test's own strays, so that a failure leaves none behind
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(workers)} workers outlived the process that started them"


def slow_identity(unit: int) -> int:
    import time

    time.sleep(0.05)
    return unit


def test_the_pool_workers_outlive_the_thread_that_started_them():
    """PR_SET_PDEATHSIG fires when the *thread* that spawned a worker ends, not its process: a pool whose first units
    were submitted from a thread that then ended (a generator advanced first by a helper thread, then by the caller)
    lost every worker to SIGKILL, and the pool broke as if the out-of-memory killer had struck."""
    import threading

    units = list(range(12))
    results = bounded_pool(slow_identity, units, workers=2)
    first: list = []
    helper = threading.Thread(target=lambda: first.append(next(results)))  # spawns the workers, then ends
    helper.start()
    helper.join()
    assert sorted([first[0][1]] + [result for _, result in results]) == units
