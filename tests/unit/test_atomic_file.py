"""Files written in place of others (exports, figures, manifests) read like any new file of the user's: an
exported encoder on a shared file system is for the team, and safetensors creates its files 0600."""

from __future__ import annotations

import os
import stat

import torch
from safetensors.torch import save_file

from mixmae_scale.atomic_file import replacing


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
