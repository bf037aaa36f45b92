"""Files written in place of others (exports, figures, manifests) read like any new file of the user's: an
exported encoder on a shared file system is for the team, and safetensors creates its files 0600. A write that
did not reach the disk fails."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from mixmae_scale.atomic_file import fsync_path, replacing, write_text


def test_a_replaced_file_gets_the_mode_of_a_new_file_under_the_umask_whatever_its_writer_chose(tmp_path):
    previous = os.umask(0o022)
    try:
        with replacing(tmp_path / "encoder.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # what safetensors itself leaves
        assert stat.S_IMODE((tmp_path / "encoder.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)
        with replacing(tmp_path / "private.txt") as tmp:
            tmp.write_text("x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def failing_fsync(monkeypatch, code: int, folders: bool):
    """os.fsync raising `code` for files, and for folders too where `folders`."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if folders or not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EDQUOT])
def test_a_file_that_does_not_reach_the_disk_fails_its_write_and_leaves_the_old_file(tmp_path, monkeypatch, code):
    """NFS and Lustre report a full disk or quota at fsync: swallowed, a checkpoint was sealed over lost data."""
    (tmp_path / "record.json").write_text("old")
    failing_fsync(monkeypatch, code, folders=False)
    with pytest.raises(OSError) as caught:
        fsync_path(tmp_path / "record.json")
    assert caught.value.errno == code
    with pytest.raises(OSError):
        write_text(tmp_path / "record.json", "new")
    assert (tmp_path / "record.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "record.json"]


def test_a_folder_is_forgiven_only_a_refusal_of_folder_fsync(tmp_path, monkeypatch):
    failing_fsync(monkeypatch, errno.EINVAL, folders=True)
    fsync_path(tmp_path)  # the file system does not fsync folders: nothing to do
    failing_fsync(monkeypatch, errno.EIO, folders=True)
    with pytest.raises(OSError, match="Input/output error"):
        fsync_path(tmp_path)
