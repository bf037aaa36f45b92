"""Small helpers every training loop needs across ranks: process-group start, scalar reductions,
the autocast context for the configured precision."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


def init(local_rank: int) -> tuple[int, int, torch.device]:
    """Start the process group (NCCL on GPUs, gloo on CPUs); returns rank, world size, device."""
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda:
        require_torch_for_the_driver()
    index = device_index(local_rank, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")) if cuda \
        else None
    if index is not None and index != local_rank:
        # DeepSpeed takes LOCAL_RANK for the device index (the process group's device_id, the engine's set_device,
        # ZeRO-3's partitioning device): a task bound to its own GPU has only index 0. The node-local rank this
        # process was started as stays `local_rank` (engine/runtime.py read it before).
        os.environ["LOCAL_RANK"] = str(index)
    if not cuda:
        skip_shm_allreduce_op()
    with contextlib.redirect_stdout(io.StringIO()) as said:
        try:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        except dist.DistNetworkError as exc:
            taken = port_taken(exc)
            if taken is None:
                raise
            raise taken from None
    # DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every rank of
    # a CPU job that loads that extension; anything else it says still gets out.
    print("".join(line for line in said.getvalue().splitlines(keepends=True) if "built successfully" not in line),
          end="")
    device = torch.device("cuda", index) if index is not None else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)  # denormals slow CPU GELU/softmax several-fold
    return dist.get_rank(), dist.get_world_size(), device


def port_taken(exc: Exception) -> Exception | None:
    """A rendezvous that cannot listen because its port is held (EADDRINUSE: another job or run on this node uses
    the same MASTER_PORT) as a one-line ConfigError, or None for any other network error. torch's DistNetworkError
    would otherwise be reported as a peer's failure (cli/failure_report.py is_peer_failure), though none failed."""
    if "EADDRINUSE" not in str(exc):
        return None
    from mixmae_scale.config import ConfigError

    port, host = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
    return ConfigError(f"the rendezvous port {port} (MASTER_PORT) is in use on {host}: another job or run on this "
                       "node holds it; give this run a free port: --set cluster.master_port=N with `mixmae launch` "
                       "(or in the cluster file), MASTER_PORT=N in the environment of sbatch launch/slurm/*.sbatch")


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed NVIDIA driver runs (cuDriverGetVersion, which needs no GPU context), or
    None where no driver library loads: a machine without NVIDIA GPUs."""
    try:
        library = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if library.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def driver_sees_a_gpu() -> bool | None:
    """Whether the driver finds a GPU this process may use (cuInit honours CUDA_VISIBLE_DEVICES, and fails with
    CUDA_ERROR_NO_DEVICE in a container started without GPUs though its driver library is mounted), or None where
    no driver library loads. Only asked where torch sees no GPU, so no CUDA context of torch's is ever at stake."""
    try:
        library = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if library.cuInit(0) != 0:
        return False
    count = ctypes.c_int(0)
    return library.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def require_torch_for_the_driver() -> None:
    """Refuses a torch built for a newer CUDA major version than the node's driver runs. Such a torch sees no GPU, so
    the run would start on the CPU (gloo) on a GPU node, said only in one warning of torch's. It is what a fresh
    `pip install "mixmae-scale[cuda12]"` gets on a CUDA 12 driver: the extra picks DALI's build, while torch comes
    from PyPI, whose newest default builds are for CUDA 13 (docs/install.md). Only the major version counts: CUDA's
    minor version compatibility runs a 12.8 build on a 12.4 driver. DS_ACCELERATOR=cpu asks for the CPU on purpose, as
    do GPUs hidden from the process (CUDA_VISIBLE_DEVICES="", a container given none): those pass."""
    from mixmae_scale.config.load import ConfigError

    built = torch.version.cuda
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not built:
        return
    driver = driver_cuda_version()
    if driver is None or int(built.split(".")[0]) <= driver[0]:
        return  # no driver (a CPU machine), or one that runs this torch: no GPU is visible for another reason
    # GPUs hidden on purpose (CUDA_VISIBLE_DEVICES="", a container given none): no torch would see one, so the CPU
    # is what was asked for; naming a torch to install sent the user to a change that would change nothing.
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1") or driver_sees_a_gpu() is False:
        return
    raise ConfigError(
        f"torch {torch.__version__} is built for CUDA {built}, but this node's NVIDIA driver runs CUDA up to "
        f"{driver[0]}.{driver[1]}, so torch sees no GPU and the run would train on the CPU: install a torch built "
        f"for CUDA {driver[0]} into this environment (pip install torch torchvision --index-url "
        f"https://download.pytorch.org/whl/cu{driver[0]}8, or another cu{driver[0]}x index of PyTorch's) or update "
        "the driver; set DS_ACCELERATOR=cpu to train on the CPU on purpose")


def device_index(local_rank: int, visible: int, cuda_visible_devices: str | None) -> int:
    """The GPU a rank uses among the `visible` ones. A launcher that shows each rank every GPU of its node (DeepSpeed's,
    torchrun, srun without binding) leaves the choice to the local rank; srun with `--gpus-per-task=1` or
    `--gpu-bind=single:1`/`map_gpu` (site defaults on many clusters) shows each task its own GPU alone, as index 0,
    where `cuda:<local rank>` would fail with "invalid device ordinal" on every rank but the first. Anything else
    (8 ranks on a node, 4 GPUs each) is refused in one line (ConfigError: the CLI's exit 2)."""
    from mixmae_scale.config.load import ConfigError
    from mixmae_scale.data.errors import plural

    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    shown = cuda_visible_devices if cuda_visible_devices is not None else "unset"
    raise ConfigError(f"local rank {local_rank} has no GPU of its own: this process sees {plural(visible, 'GPU')} "
                      f"(CUDA_VISIBLE_DEVICES={shown}); "
                      "start one rank per GPU, each seeing every GPU of its node or its own GPU alone")


SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_shm_allreduce_op() -> None:
    """Keeps DeepSpeed's CPU backend from compiling its shared-memory all-reduce extension.

    `init_distributed` on the CPU accelerator builds that C++ op with ninja on first use (about 40 s on two
    cores, on every fresh machine or clone; later launches load it from TORCH_EXTENSIONS_DIR) and maps a
    66 MiB /dev/shm buffer per rank with it. Only DeepSpeed's inference all-reduce (AutoTP layers) uses the
    op: training reduces through the gloo process group either way. DeepSpeed builds it only when its op
    table, `deepspeed.ops.__compatible_ops__` (probed once, kept in the module so edits to it persist), marks
    it compatible, so the entry is set to False before the backend starts."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if isinstance(compatible, dict):
        compatible[SHM_OP] = False


def shutdown(master_addr: str, master_port: str) -> None:
    """Orderly end of a job: ZeRO-3 ranks abort at exit without it.

    DeepSpeed's CPU all-reduce maps a 66 MiB shared-memory buffer per rank
    (`/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`, csrc/cpu/comm/shm.cpp) and
    never unlinks it, so every CPU run would leave RAM behind until reboot. Each rank removes its own
    once all ranks are done with them; a rank killed outright still leaves its buffer. `master_addr` and
    `master_port` are the rendezvous the launcher gave (MASTER_ADDR, MASTER_PORT): part of the name."""
    if not dist.is_initialized():
        return
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    remove_shm_buffer(master_addr, master_port, rank)


def remove_shm_buffer(master_addr: str, master_port: str, rank: int) -> None:
    """This rank's DeepSpeed CPU all-reduce buffer (see `shutdown`); also called by a failing rank, which
    exits without the orderly shutdown."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


SHM_PREFIX = "deepspeed_allreduce_buffer_"


def remove_stale_shm_buffers(min_age_s: float = 60.0) -> list[str]:
    """Buffers a killed run left in /dev/shm (RAM until reboot): only this user's (the uid is in the name), only
    those no live process maps or holds open, and only those untouched for `min_age_s` (a rank starting beside
    us may have created its own but not mapped it yet). Called by each node's first rank before the process
    group starts; returns the names removed."""
    shm = Path("/dev/shm")
    mine = sorted(shm.glob(f"{SHM_PREFIX}{os.getuid()}_*")) if shm.is_dir() else []
    if not mine:
        return []
    in_use = _shm_files_in_use()
    removed = []
    for path in mine:
        try:
            if str(path) in in_use or time.time() - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed.append(path.name)
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def _shm_files_in_use() -> set[str]:
    """/dev/shm files mapped (/proc/PID/maps) or open (/proc/PID/fd) by any process we may look at."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            used.update(line.split(None, 5)[5].strip() for line in (proc / "maps").read_text().splitlines()
                        if "/dev/shm/" in line and len(line.split(None, 5)) == 6)
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target)
        except OSError:  # a process that ended, or one of another user's
            continue
    return {name.removesuffix(" (deleted)") for name in used}


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def all_reduce_scalar(value: float, op=dist.ReduceOp.SUM) -> float:
    return float(_all_reduce(value, torch.float64, op))


def all_reduce_int(value: int, op=dist.ReduceOp.SUM) -> int:
    """Exact for sums below 2^63, where float64 rounds past 2^53."""
    return int(_all_reduce(value, torch.int64, op))


def _all_reduce(value, dtype: torch.dtype, op):
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.item()

