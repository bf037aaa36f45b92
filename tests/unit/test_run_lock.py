"""One run at a time in a run folder (engine/run_lock.py). Two real processes on this host contend for the lock;
several ranks and several hosts are not available here, so the broadcast of rank 0's decision is simulated with a
stand-in for torch.distributed that carries rank 0's outcome to a rank 1 run after it in this process, and the
cross-host behaviour (which depends on the file system's flock support) is not tested."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mixmae_scale.engine import run_folder, run_lock, runtime
from mixmae_scale.engine.checkpointing.store import ResumeError

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; from pathlib import Path; from mixmae_scale.engine import run_lock; "
        "run_lock.take(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")


@pytest.fixture(autouse=True)
def nothing_held_after():
    yield
    run_lock.release_all()


def test_a_second_taker_is_refused_naming_the_holder_until_the_holder_exits(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.RunFolderInUse) as refused:
            run_lock.take(run)
        message = str(refused.value)
        assert "\n" not in message and isinstance(refused.value, ResumeError)  # the CLI's exit 2
        assert message.startswith(f"{run} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, "
                                  "job 4242, since ")
        assert message.endswith("or start this one in a new --run-dir")
    finally:
        holder.kill()  # no release of its own: the kernel drops the lock with the process
        holder.wait()
    lock = run_lock.take(run)
    record = json.loads((run / run_lock.LOCK).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()


def test_a_lock_held_by_this_same_jobs_earlier_incarnation_says_so_and_how_to_clear_it(tmp_path, monkeypatch):
    """A requeue after a node crash: on NFS the dead node's lock can outlive it, and the requeued job (same
    SLURM_JOB_ID) was told "in use by another run", which sends the user looking for a run that does not exist.
    A live holder with the same job id stands in for the stale one (no second host, no NFS here)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        with pytest.raises(run_lock.RunFolderInUse) as refused:
            run_lock.take(run)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{run} is held by an earlier incarnation of this same job 4242 (host "
                                  f"{socket.gethostname()}, pid {holder.pid}, job 4242, since ")
        assert f"remove {run / run_lock.LOCK}" in message and "requeue" in message
        monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: the usual refusal
        with pytest.raises(run_lock.RunFolderInUse, match="is in use by another run"):
            run_lock.take(run)
    finally:
        holder.kill()
        holder.wait()


def test_takes_one_after_another_in_one_process_work_and_the_same_process_cannot_take_twice(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run, kept = tmp_path / "new", tmp_path / "kept"
    first = run_lock.take(run)
    with pytest.raises(run_lock.RunFolderInUse, match=rf"pid {os.getpid()}, no Slurm job, since "):
        run_lock.take(run)  # a run holds its folder alone, in this process too
    first.release()
    assert not run.exists()  # made by the take, left empty: a refused start into a new folder leaves nothing
    kept.mkdir()
    (kept / "metrics.csv").write_text("step\n")
    run_lock.take(kept).release()
    run_lock.take(kept).release()
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.csv"]  # no lock file left behind


def test_the_runtime_releases_the_lock_when_the_work_ends_however_it_ends(tmp_path, monkeypatch):
    """The in-process sweep (scaling/in_process.py) runs each run through run_rank, one after another."""
    for key in runtime.WORLD_OF_ONE:
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"

    def finished(rank: int, local_rank: int) -> int:
        run_lock.take(run)
        (run / "summary.json").write_text("{}")
        return 0

    def failed(rank: int, local_rank: int) -> int:
        run_lock.take(run)
        raise ResumeError("refused")

    assert runtime.run_rank(finished, lambda *a: None) == 0
    assert runtime.run_rank(failed, lambda *a: None, is_mistake=lambda exc: True) == 2
    assert runtime.run_rank(finished, lambda *a: None) == 0
    assert not (run / run_lock.LOCK).exists()


def test_overwrite_moves_the_run_aside_and_holds_the_new_folder(tmp_path):
    run = tmp_path / "run"
    run_lock.take(run)
    assert not run_folder.holds_files(run)  # the lock file alone: a new folder, nothing to move aside
    (run / "metrics.csv").write_text("step\n")
    note = run_folder.prepare(run, "auto", overwrite=True)
    moved = tmp_path / "run.old-1"
    assert note and str(moved) in note
    assert sorted(p.name for p in moved.iterdir()) == ["metrics.csv"]  # the moved run keeps no lock file
    assert (run / run_lock.LOCK).exists() and list(run_lock._held) == [os.path.abspath(run)]
    with pytest.raises(run_lock.RunFolderInUse):
        run_lock.take(run)


def test_rank_0_decides_and_every_rank_gets_the_refusal(tmp_path, monkeypatch):
    run = tmp_path / "run"
    wire: list = []

    def as_rank(rank: int) -> types.SimpleNamespace:
        def broadcast(outcome, src):
            if rank == 0:
                wire[:] = outcome
            else:
                outcome[:] = wire
        return types.SimpleNamespace(get_rank=lambda: rank, broadcast_object_list=broadcast)

    held = run_lock.take(run)  # another run's, as far as this start can tell
    for rank in (0, 1):
        monkeypatch.setattr(run_folder, "dist", as_rank(rank))
        with pytest.raises(ResumeError, match=rf"^{run} is in use by another run \(host "):
            run_folder.agree_on_lock(run)
    held.release()
    monkeypatch.setattr(run_folder, "dist", as_rank(0))
    run_folder.agree_on_lock(run)
    assert (run / run_lock.LOCK).exists()


def test_start_run_takes_the_lock_before_the_run_folder_is_prepared(tmp_path, monkeypatch):
    """start_run up to the run folder, with the process group, data and configuration stubbed (no DeepSpeed)."""
    from mixmae_scale.engine import loop

    order = []

    class Stop(Exception):
        pass

    def prepare(root, resume, overwrite, job=None):
        order.append(("agree_on_run_folder", (root / run_lock.LOCK).exists()))
        raise Stop

    monkeypatch.setattr(loop, "StopFlag", lambda: None)
    monkeypatch.setattr(loop, "job_crop_scale", lambda config, job: None)
    monkeypatch.setattr(loop.distributed, "init", lambda local_rank: (0, 1, "cpu"))
    monkeypatch.setattr(loop, "training_mixture", lambda *a: types.SimpleNamespace(
        expected_samples=1, too_small=lambda split, world, micro: None))
    monkeypatch.setattr(loop, "resolve", lambda *a, **k: types.SimpleNamespace(
        derived=types.SimpleNamespace(micro_batch=1)))
    monkeypatch.setattr(loop, "engine_config", lambda *a: {})
    monkeypatch.setattr(loop, "optimizer_layout", lambda *a: None)
    monkeypatch.setattr(loop, "agree_on_configuration", lambda *a: None)
    monkeypatch.setattr(run_folder, "dist", types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1,
                                                                  broadcast_object_list=lambda o, src: None))
    real, shared = run_folder.agree_on_lock, run_folder.agree_on_shared_folder
    monkeypatch.setattr(run_folder, "agree_on_lock", lambda root: (order.append(("agree_on_lock",)), real(root)))
    monkeypatch.setattr(run_folder, "agree_on_shared_folder",
                        lambda root: (order.append(("agree_on_shared_folder",)), shared(root)))
    monkeypatch.setattr(run_folder, "agree_on_run_folder", prepare)
    config = types.SimpleNamespace(data=types.SimpleNamespace(shards="s", train_split="train", sources=[]),
                                   checkpoint=types.SimpleNamespace(resume="auto"))
    with pytest.raises(Stop):
        loop.start_run(config, [], tmp_path / "run", 0)
    assert order == [("agree_on_lock",), ("agree_on_shared_folder",), ("agree_on_run_folder", True)]


def test_a_file_system_without_flock_warns_and_runs_unlocked(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    assert run_lock.take(tmp_path / "run") is None
    assert "cannot be locked on this file system" in caplog.text
