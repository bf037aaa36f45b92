"""Ranks straight from Slurm: one `srun` task per GPU, no launcher in between.

The layout most large trainers use (Megatron, torchtitan, Lightning): Slurm starts every rank itself, so its
signals (`--signal=USR1@300`, SIGTERM at the time limit or on `scancel`) reach each rank directly and
nothing stands between a rank and the scheduler. A rank reads its place from `srun`'s environment
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); the rendezvous is MASTER_ADDR/MASTER_PORT when the batch script
exports them, else the step's first host and a port derived from the job id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-010,012],cpu1' -> 'gpu003' (scontrol's own order)."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if not head or not head.group(1) and not head.group(3):
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def ranks_from_slurm(env: Mapping[str, str]) -> dict[str, str] | None:
    """torch.distributed's variables for a task `srun` started, or None where this is not such a task (no
    SLURM_STEP_ID: the batch script itself, an salloc shell) or a launcher already set them (RANK)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    if env.get("SLURM_STEP_ID") in ("batch", "extern", "interactive"):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": port}
