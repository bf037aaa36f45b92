"""A save that fills the disk, and the start after it (engine/checkpointing/store.py, engine/run_folder.py): the save
says it ran out of space, naming the folder, the free bytes and the size of the last complete checkpoint (torch's
writer says only "unexpected pos"); the next start removes the `.partial` folder the failed save left, once it holds
the run's lock and only then (a live run's save in progress is a `.partial` folder too), even where the full disk
refuses the lock's own record."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from mixmae_scale.engine import run_folder, run_lock
from mixmae_scale.engine.checkpointing import store

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 12534080 vs 12533960"
Usage = namedtuple("Usage", "total used free")


class Engine:
    """DeepSpeed's save stood in for: writes a 1000-byte model file, or part of it and then fails as told."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
        folder = Path(ckpt_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * (300 if self.failure else 1000))
        if self.failure is not None:
            raise self.failure


def save(ckpt_dir: Path, step: int, engine: Engine):
    return store.save(engine, ckpt_dir, store.SaveRequest(step, keep_last=2), {"step": step}, {"rank": 0})


def free_bytes(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - free, free))


def test_torch_s_unexpected_pos_on_a_full_disk_is_said_as_a_full_disk(tmp_path, gloo_of_one, monkeypatch):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    save(ckpt_dir, 2, Engine())
    last = sum(p.stat().st_size for p in (ckpt_dir / "step00000002").rglob("*") if p.is_file())
    free_bytes(monkeypatch, 100)
    with pytest.raises(Exception) as failed:
        save(ckpt_dir, 4, Engine(RuntimeError(TORCH_FULL)))
    message = str(failed.value)
    assert "for want of space" in message and TORCH_FULL in message
    assert f"{ckpt_dir / 'step00000004.partial'}" in message and "100 bytes free" in message
    assert f"the last complete checkpoint (step00000002) takes {last} bytes" in message
    assert "checkpoint.keep_last=2 needs room for 3 checkpoints" in message
    assert isinstance(failed.value, store.NoSpaceForCheckpoint) and failed.value.errno == errno.ENOSPC
    from mixmae_scale.cli.failure_report import is_refused_input, is_user_mistake

    assert is_user_mistake(failed.value) and not is_refused_input(failed.value)  # one line, exit 1


def test_an_enospc_anywhere_in_the_chain_is_a_full_disk_even_with_room_now(tmp_path, gloo_of_one, monkeypatch):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    free_bytes(monkeypatch, 10**8)
    try:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    except OSError as quota:
        wrapped = RuntimeError("writing the optimizer shard failed")
        wrapped.__cause__ = quota
    with pytest.raises(store.NoSpaceForCheckpoint, match="100000000 bytes free, no complete checkpoint yet"):
        save(ckpt_dir, 2, Engine(wrapped))


def test_another_failure_with_room_to_spare_stays_as_it_was(tmp_path, gloo_of_one, monkeypatch):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    save(ckpt_dir, 2, Engine())
    free_bytes(monkeypatch, 10**8)
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access$"):
        save(ckpt_dir, 4, Engine(RuntimeError("CUDA error: an illegal memory access")))


def test_the_next_start_removes_the_partial_a_failed_save_left_once_it_holds_the_lock(tmp_path, gloo_of_one,
                                                                                         monkeypatch):
    root = tmp_path / "run"
    save(root / "checkpoints", 2, Engine())
    left = root / "checkpoints" / "step00000004.partial"
    left.mkdir()
    (left / "mp_rank_00_model_states.pt").write_bytes(b"m" * 300)
    other = run_lock.take(root)  # a live run holds the folder: its save in progress is a .partial folder too
    with pytest.raises(store.ResumeError, match="in use by another run"):
        run_folder.agree_on_lock(root)
    assert left.exists()
    other.release()
    real_pwrite = os.pwrite

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)  # the full disk refuses the lock's record
    notes = run_folder.agree_on_lock(root)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert not left.exists() and store.complete_tags(root / "checkpoints") == ["step00000002"]
    assert notes == [f"removed what failed or interrupted saves left in {root / 'checkpoints'}: "
                     "step00000004.partial"]
    with pytest.raises(store.ResumeError, match="in use by another run"):  # held, though its record is not written
        run_lock.take(root)
