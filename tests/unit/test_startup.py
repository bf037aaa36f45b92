"""What a CPU launch does before its first step that it need not: DeepSpeed's shared-memory all-reduce op (a JIT
C++ build of about 40 s on a fresh machine) is never built, because training never uses it."""

from __future__ import annotations

import os


def test_a_cpu_process_group_asks_deepspeed_for_no_shared_memory_op(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a build, were one started, would land here
    import importlib

    from mixmae_scale.engine.distributed import SHM_OP, skip_shm_allreduce_op

    skip_shm_allreduce_op()
    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would find deepspeed.comm's torch

    assert deepspeed.ops.__compatible_ops__[SHM_OP] is False
    assert ds_torch.build_shm_op() is None  # what DeepSpeed's TorchBackend calls when the process group starts
    assert not any(os.scandir(tmp_path))
