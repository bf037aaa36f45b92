"""One srun task per GPU (launch/slurm/pretrain_srun.sbatch): which GPU a task uses, and that a node runs as many
tasks as it has GPUs. No GPU and no Slurm here: the visible-device count is passed in (or torch.cuda's answers are
stubbed, with DeepSpeed's init_distributed replaced by a recorder), and Slurm's variables are set by hand as srun
sets them for `--ntasks-per-node`, `--gpus-per-node` and a two-node allocation."""

from __future__ import annotations

import types

import pytest

from mixmae_scale.cluster import slurm_ranks
from mixmae_scale.config import ConfigError
from mixmae_scale.engine import distributed

TASK = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NODEID": "1"}


@pytest.mark.parametrize(("local_rank", "visible", "index"), [(0, 8, 0), (7, 8, 7), (0, 1, 0), (3, 1, 0), (1, 2, 1)])
def test_a_rank_uses_its_local_rank_among_all_the_node_gpus_or_its_own_gpu_alone(local_rank, visible, index):
    assert distributed.device_index(local_rank, visible, "3" if visible == 1 else None) == index


def test_a_rank_with_no_gpu_of_its_own_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        distributed.device_index(5, 4, "0,1,2,3")
    assert str(refused.value).startswith("local rank 5 has no GPU of its own: this process sees 4 GPUs "
                                         "(CUDA_VISIBLE_DEVICES=0,1,2,3); ")
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES=unset"):
        distributed.device_index(2, 2, None)


def test_a_task_bound_to_one_gpu_starts_on_it_and_deepspeed_is_told_index_0(monkeypatch):
    """DeepSpeed reads LOCAL_RANK as the device index (process group device_id, engine set_device, ZeRO-3)."""
    seen = {}

    def init_distributed(dist_backend):
        seen["backend"], seen["LOCAL_RANK"] = dist_backend, distributed.os.environ["LOCAL_RANK"]

    monkeypatch.setitem(__import__("sys").modules, "deepspeed", types.SimpleNamespace(
        init_distributed=init_distributed))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: seen.setdefault("set", device))
    monkeypatch.setattr(distributed, "dist", types.SimpleNamespace(get_rank=lambda: 3, get_world_size=lambda: 8))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    rank, world, device = distributed.init(3)
    assert (rank, world, str(device), str(seen["set"])) == (3, 8, "cuda:0", "cuda:0")
    assert seen == {"backend": "nccl", "LOCAL_RANK": "0", "set": device}


def test_per_node_counts_read_slurms_compressed_form():
    assert slurm_ranks.expand_counts("8(x2),4") == [8, 8, 4]
    assert slurm_ranks.tasks_per_node({"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}) == (
        8, "SLURM_TASKS_PER_NODE=8(x2)")
    assert slurm_ranks.tasks_per_node({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1"})[0] == 1
    assert slurm_ranks.gpus_on_node({"SLURM_GPUS_PER_NODE": "a100:4,v100:2"})[0] == 6
    assert slurm_ranks.gpus_on_node({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"})[0] == 4
    assert slurm_ranks.gpus_on_node({"CUDA_VISIBLE_DEVICES": "0"}) is None  # a bound task's own GPU only


def test_a_node_with_fewer_tasks_than_gpus_is_refused_and_a_matching_one_starts():
    one_per_node = {**TASK, "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_PER_NODE": "8"}
    with pytest.raises(ConfigError) as refused:
        slurm_ranks.ranks_from_slurm(one_per_node)
    assert str(refused.value) == (
        "SLURM_NTASKS_PER_NODE=1 starts 1 task on this node, which has 8 GPUs (SLURM_GPUS_PER_NODE=8): the srun "
        "layout runs one task per GPU; submit with --ntasks-per-node=8, or set MIXMAE_GPUS_PER_NODE=1 to use 1 "
        "GPU per node on purpose")
    eight = (r"^SLURM_TASKS_PER_NODE=8\(x2\) starts 8 tasks on this node, which has 4 GPUs "
             r"\(SLURM_GPUS_ON_NODE=4\)")
    with pytest.raises(ConfigError, match=eight):
        slurm_ranks.ranks_from_slurm({**TASK, "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "4"})
    assert slurm_ranks.ranks_from_slurm({**TASK, "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_PER_NODE": "8"})[
        "LOCAL_RANK"] == "1"
    assert slurm_ranks.ranks_from_slurm({**TASK, "SLURM_TASKS_PER_NODE": "8(x2)"}) is not None  # no GPU count: CPU
    assert slurm_ranks.ranks_from_slurm({**one_per_node, "RANK": "0"}) is None  # a launcher's ranks: not this layout


def test_the_cli_exits_2_on_the_mismatch_before_any_work(monkeypatch, capsys):
    from mixmae_scale.cli import main

    for key, value in {**TASK, "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "MIXMAE_GPUS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert main(["pretrain", "--profile", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("mixmae: error: SLURM_NTASKS_PER_NODE=1 starts 1 task ")


@pytest.mark.parametrize("nodelist, host", [
    ("rack[1-2]-node[01-08]", "rack1-node01"),  # several bracket groups in one name
    ("gpu[01-02]-ib", "gpu01-ib"),  # a suffix after the brackets
    ("node[01-03,07]", "node01"),
    ("gpu[003-010,012],cpu1", "gpu003"),
    ("n1,n2", "n1"),
    ("localhost", "localhost"),
])
def test_the_rendezvous_host_is_the_first_host_of_the_slurm_node_list(nodelist, host):
    """MASTER_ADDR, where the batch script exports none, is the step's first host as `scontrol show hostnames`
    lists it: a misread name ('rack1', 'gpu01') is a host no rank can reach, and every rank waits at the
    rendezvous until its timeout."""
    from mixmae_scale.cluster.slurm_ranks import first_host

    assert first_host(nodelist) == host


@pytest.mark.parametrize("built, driver, refused", [("13.0", (12, 8), True), ("13.0", (12, 2), True),
                                                    ("12.8", (12, 4), False), ("12.8", (13, 0), False),
                                                    ("13.0", None, False)])
def test_a_torch_built_for_a_newer_cuda_than_the_driver_is_refused_before_the_cpu_process_group(
        monkeypatch, built, driver, refused):
    """A fresh `pip install "mixmae-scale[cuda12]"` on a CUDA 12 driver gets PyPI's torch, built for CUDA 13: it sees
    no GPU, and the run would have started on the CPU (gloo) on a GPU node. A newer minor version (12.8 on a 12.4
    driver) runs, by CUDA's minor version compatibility; no driver at all is a CPU machine."""
    started = {}
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", types.SimpleNamespace(
        init_distributed=lambda dist_backend: started.setdefault("backend", dist_backend)))
    monkeypatch.setattr(distributed, "skip_shm_allreduce_op", lambda: None)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.torch.version, "cuda", built)
    monkeypatch.setattr(distributed, "driver_cuda_version", lambda: driver, raising=False)
    monkeypatch.setattr(distributed, "dist", types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1))
    monkeypatch.setattr(distributed.torch, "set_flush_denormal", lambda on: None)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if not refused:
        assert distributed.init(0)[2] == distributed.torch.device("cpu")
        assert started == {"backend": "gloo"}
        return
    with pytest.raises(ConfigError) as stop:
        distributed.init(0)
    assert str(stop.value).startswith(
        f"torch {distributed.torch.__version__} is built for CUDA {built}, but this node's NVIDIA driver runs CUDA up "
        f"to {driver[0]}.{driver[1]}, so torch sees no GPU and the run would train on the CPU: ")
    assert f"install a torch built for CUDA {driver[0]} into this environment" in str(stop.value)
    assert started == {}  # refused before the process group
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the CPU on purpose
    assert distributed.init(0)[2] == distributed.torch.device("cpu") and started == {"backend": "gloo"}


class _Driver:
    """libcuda.so.1 as ctypes loads it: a 12.8 driver whose cuInit finds `gpus` devices (CUDA_ERROR_NO_DEVICE, 100,
    where it finds none)."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def cuDriverGetVersion(self, version) -> int:  # noqa: N802 - the driver's name
        version._obj.value = 12080
        return 0

    def cuInit(self, flags: int) -> int:  # noqa: N802
        return 0 if self.gpus else 100

    def cuDeviceGetCount(self, count) -> int:  # noqa: N802
        count._obj.value = self.gpus
        return 0


@pytest.mark.parametrize("hidden", ["CUDA_VISIBLE_DEVICES=''", "a container given no GPU"])
def test_a_node_whose_gpus_are_hidden_on_purpose_trains_on_the_cpu_whatever_cuda_torch_is_built_for(
        monkeypatch, hidden):
    """CUDA_VISIBLE_DEVICES="" (or a container started without GPUs, the driver library mounted all the same) shows
    torch no GPU on purpose: a CUDA 13 torch on that 12.x driver is then no reason to stop, as it would see no GPU with
    any driver. The check refused it, naming a torch to install that would have changed nothing."""
    started = {}
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", types.SimpleNamespace(
        init_distributed=lambda dist_backend: started.setdefault("backend", dist_backend)))
    monkeypatch.setattr(distributed, "skip_shm_allreduce_op", lambda: None)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.torch.version, "cuda", "13.0")
    monkeypatch.setattr(distributed, "dist", types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1))
    monkeypatch.setattr(distributed.torch, "set_flush_denormal", lambda on: None)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: _Driver(gpus=1))
    assert distributed.driver_cuda_version() == (12, 8)
    with pytest.raises(ConfigError):  # the driver sees a GPU that this torch cannot use: refused
        distributed.init(0)
    if hidden == "CUDA_VISIBLE_DEVICES=''":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    else:
        monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: _Driver(gpus=0))
    assert distributed.init(0)[2] == distributed.torch.device("cpu") and started == {"backend": "gloo"}


def test_a_rendezvous_port_another_job_holds_is_refused_in_one_line_not_blamed_on_a_rank(monkeypatch):
    """Two jobs on one node with one MASTER_PORT (one cluster.master_port set for both, or a plain `deepspeed`
    command's default 29500): rank 0's store cannot listen (EADDRINUSE). torch raises
    DistNetworkError, which the failure report took for a peer's failure ("stopped: another rank failed"), though
    no rank had failed: the port was taken. The store here is torch's own, on a port this test holds."""
    import datetime
    import socket

    import torch.distributed as dist

    def init_distributed(dist_backend):  # what init_process_group does first on rank 0
        dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=5))

    monkeypatch.setitem(__import__("sys").modules, "deepspeed", types.SimpleNamespace(
        init_distributed=init_distributed))
    monkeypatch.setattr(distributed, "skip_shm_allreduce_op", lambda: None)
    monkeypatch.setattr(distributed, "require_torch_for_the_driver", lambda: None)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(ConfigError, match=f"rendezvous port {port} .*is in use on 127.0.0.1.* "
                                              "cluster.master_port"):
            distributed.init(0)
