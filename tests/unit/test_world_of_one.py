"""A process started without a launcher (a sweep's worker, `mixmae eval` on a laptop) is a world of one. Its
process group's store binds the port itself: a port probed free and handed on can be taken in between by another
such process, and a sweep starts several at once."""

from __future__ import annotations

import os

import torch.distributed as dist

from mixmae_scale.engine import runtime


def test_a_process_alone_starts_its_group_on_a_port_its_store_binds_and_leaves_the_environment_as_it_was(
        monkeypatch):
    for key in runtime.WORLD_OF_ONE:
        monkeypatch.delenv(key, raising=False)
    seen = {}

    def work(rank: int, local_rank: int) -> int:
        seen["env_port"] = os.environ["MASTER_PORT"]
        dist.init_process_group("gloo")  # env://, as DeepSpeed's init_distributed starts it
        store = dist.distributed_c10d._get_default_store()
        while hasattr(store, "underlying_store"):  # PrefixStores around the TCPStore
            store = store.underlying_store
        seen["bound_port"] = store.port
        seen["world"] = dist.get_world_size()
        return 0

    def report(rank, exc, alone):
        raise AssertionError(f"the work failed: {exc!r}")

    assert runtime.run_rank(work, report) == 0
    assert seen["env_port"] == "0" and seen["world"] == 1
    assert seen["bound_port"] > 0  # the kernel's choice, made as the store bound it
    assert not dist.is_initialized()
    assert not any(key in os.environ for key in runtime.WORLD_OF_ONE)


def test_a_rank_exits_2_on_a_refused_input_and_1_on_a_failure(monkeypatch):
    """Scripts that resubmit tell the two apart: a mistake in the input fails again as it is, a failure may not."""
    from mixmae_scale.cli.failure_report import is_refused_input
    from mixmae_scale.config import ConfigError
    from mixmae_scale.data.manifest import DataError

    for key in runtime.WORLD_OF_ONE:
        monkeypatch.delenv(key, raising=False)
    reported = []

    def failing(exc: BaseException):
        def work(rank: int, local_rank: int) -> int:
            raise exc
        return work

    def report(rank, exc, alone):
        reported.append((type(exc).__name__, alone))

    def code(exc: BaseException) -> int:
        return runtime.run_rank(failing(exc), report, is_mistake=is_refused_input)

    assert code(ConfigError("batch.micro=0: must be at least 1")) == 2
    assert code(DataError("data.shards=/nowhere: no dataset.json")) == 2
    assert code(ModuleNotFoundError("No module named 'nvidia.dali'", name="nvidia.dali")) == 2
    assert code(RuntimeError("CUDA error: an illegal memory access")) == 1
    assert code(FileNotFoundError("/shared/shards/train-0042.tar")) == 1  # a shared file system's hiccup, too
    assert code(ModuleNotFoundError("No module named 'yaml'", name="yaml")) == 1  # a broken install is no input
    assert reported == [("ConfigError", True), ("DataError", True), ("ModuleNotFoundError", True),
                        ("RuntimeError", True), ("FileNotFoundError", True), ("ModuleNotFoundError", True)]
