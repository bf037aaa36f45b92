"""Ranks straight from Slurm: one `srun` task per GPU, no launcher in between.

The layout most large trainers use (Megatron, torchtitan, Lightning): Slurm starts every rank itself, so its
signals (`--signal=USR1@300`, SIGTERM at the time limit or on `scancel`) reach each rank directly and
nothing stands between a rank and the scheduler. A rank reads its place from `srun`'s environment
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); the rendezvous is MASTER_ADDR/MASTER_PORT when the batch script
exports them, else the step's first host and a port derived from the job id.

One task per GPU is the layout's premise, so the tasks on a node must be as many as its GPUs where both are known
(`tasks_per_node`, `gpus_on_node`): a step started with `--ntasks-per-node=1` on 8-GPU nodes would otherwise train
on one GPU per node without a word. Which GPU a task uses is engine/distributed.py's `device_index`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mixmae_scale.config.load import ConfigError
from mixmae_scale.data.errors import plural


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, as `scontrol show hostnames` would list it first: the first
    comma-separated item at bracket depth 0, each bracket group replaced by its first value
    ('gpu[003-010,012],cpu1' -> 'gpu003', 'rack[1-2]-node[01-08]' -> 'rack1-node01', 'gpu[01-02]-ib' ->
    'gpu01-ib'). Reading only up to the first bracket group gave 'rack1' and 'gpu01': hosts no rank can reach."""
    text, depth, end = nodelist.strip(), 0, None
    for index, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if depth < 0:
            break
        if char == "," and depth == 0:
            end = index
            break
    item = text[:end]
    host = re.sub(r"\[([^\[\]]*)\]", lambda group: re.split(r"[,-]", group.group(1))[0].strip(), item)
    if depth < 0 or not host or re.search(r"[\[\],]", host):
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    return host


def default_port(job_id: str) -> int:
    """The rendezvous port of a job that names none: 10000 + job id % 20000, so that two jobs sharing a node differ,
    and below Linux's ephemeral range (32768-60999), where an outgoing connection on the node may hold it (20000 +
    job id % 20000 landed there for 36% of ids). launch/slurm/*.sbatch compute the same in bash (a test keeps the
    three equal)."""
    return 10000 + int(job_id or 0) % 20000


def ranks_from_slurm(env: Mapping[str, str]) -> dict[str, str] | None:
    """torch.distributed's variables for a task `srun` started, or None where this is not such a task (no
    SLURM_STEP_ID: the batch script itself, an salloc shell) or a launcher already set them (RANK)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    if env.get("SLURM_STEP_ID") in ("batch", "extern", "interactive"):
        return None
    check_tasks_match_gpus(env)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    port = env.get("MASTER_PORT") or str(default_port(env.get("SLURM_JOB_ID", "0")))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": port}


def expand_counts(compressed: str) -> list[int]:
    """Slurm's per-node counts, one per node: '8(x2),4' -> [8, 8, 4] (SLURM_TASKS_PER_NODE's form)."""
    counts = []
    for item in compressed.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"cannot read per-node counts from {compressed!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def tasks_per_node(env: Mapping[str, str]) -> tuple[int, str] | None:
    """The tasks this node runs and the variable that says so, or None where no variable does."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(key, "").strip()
        if not value:
            continue
        try:
            counts = expand_counts(value)
        except ValueError:
            continue
        node = int(env.get("SLURM_NODEID", "0") or 0)
        return (counts[node] if node < len(counts) else counts[-1]), f"{key}={value}"
    return None


def gpus_on_node(env: Mapping[str, str]) -> tuple[int, str] | None:
    """The node's GPUs and the variable that says so, in the order pretrain_srun.sbatch's `gpus_on_node` reads
    them (MIXMAE_GPUS_PER_NODE, SLURM_GPUS_ON_NODE, the request 'a100:4,v100:2'), or None where none is set. Not
    the device lists: with --gpus-per-task or --gpu-bind a task's CUDA_VISIBLE_DEVICES names its own GPU only."""
    for key in ("MIXMAE_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        value = env.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), f"{key}={value}"
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS_PER_NODE"):
        value = env.get(key, "").strip()
        if not value:
            continue
        counts = [item.split("(")[0].rsplit(":", 1)[-1] for item in value.split(",")]
        return sum(int(c) if c.isdigit() else 1 for c in counts), f"{key}={value}"
    return None


def check_tasks_match_gpus(env: Mapping[str, str]) -> None:
    """One task per GPU: a node's task count other than its GPU count is refused in one line (ConfigError)."""
    tasks, gpus = tasks_per_node(env), gpus_on_node(env)
    if tasks is None or gpus is None or tasks[0] == gpus[0]:
        return
    raise ConfigError(f"{tasks[1]} starts {plural(tasks[0], 'task')} on this node, which has "
                      f"{plural(gpus[0], 'GPU')} ({gpus[1]}): "
                      f"the srun layout runs one task per GPU; submit with --ntasks-per-node={gpus[0]}, or set "
                      f"MIXMAE_GPUS_PER_NODE={tasks[0]} to use {plural(tasks[0], 'GPU')} per node on purpose")
