"""What a start does that it need not. A CPU launch: DeepSpeed's shared-memory all-reduce op (a JIT C++ build of
about 40 s on a fresh machine) is never built, because training never uses it. The Slurm scripts' python helpers:
no numpy or PIL."""

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


def test_the_slurm_scripts_python_helpers_import_neither_numpy_nor_pil():
    """The Slurm scripts start python for cluster/shell_env.py, restart.py and requeue.py (each parses the job's
    arguments with the CLI's parser) before and after every step: the parser pulled in numpy and PIL through the
    shard commands' default rejection limit, 0.2 s of a 0.3 s start, in every submission the unit tests simulate."""
    import subprocess
    import sys

    code = ("import sys, mixmae_scale.cluster.shell_env, mixmae_scale.cluster.requeue, mixmae_scale.cluster.restart, "
            "mixmae_scale.cli; mixmae_scale.cli.build_parser(); print(sorted({'numpy', 'PIL'} & set(sys.modules)))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]"
