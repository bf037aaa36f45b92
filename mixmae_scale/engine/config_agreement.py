"""Every rank runs the same configuration, checked once at start.

A stale file on one node or mixed hardware (precision.dtype=auto decides per machine) would otherwise
train ranks that disagree on the model, the batch or the optimizer layout, and fail much later inside a
collective. Every rank compares a digest of its resolved configuration, DeepSpeed config and optimizer
layout with rank 0's; a difference ends the job on every rank with one message naming the keys.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import torch.distributed as dist

from mixmae_scale.config import ConfigError, ResolvedConfig


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True, default=str)}


def agree_on_configuration(resolved: ResolvedConfig, ds_config: dict[str, Any], layout: dict[str, Any]) -> str:
    """Collective. Every rank's resolved configuration, DeepSpeed config and optimizer layout must be rank 0's;
    otherwise every rank raises one ConfigError naming the ranks, their hosts and the first keys that differ."""
    settings = resolved.to_dict()
    # The device's name in the reasons may differ (two GPU models of one generation); what was chosen may not.
    settings["derived"] = {k: v for k, v in settings["derived"].items() if k not in ("dtype_reason", "dtype_warning")}
    mine = _flat({"config": {**settings, "sources": None}, "deepspeed": ds_config, "layout": layout})
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:16]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest, socket.gethostname()))
    reference = gathered[0][0]
    odd = [rank for rank, (other, _) in enumerate(gathered) if other != reference]
    if not odd:
        return digest
    first = odd[0]
    values: list[Any] = [None]
    if dist.get_rank() == first:
        values[0] = mine
    dist.broadcast_object_list(values, src=first)
    rank0_values: list[Any] = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(rank0_values, src=0)
    theirs, ours = values[0], rank0_values[0]
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    shown = "; ".join(f"{k}: {ours.get(k)} on rank 0, {theirs.get(k)} on rank {first}" for k in keys[:4])
    ranks = ", ".join(f"{r} ({gathered[r][1]})" for r in odd[:8]) + (" ..." if len(odd) > 8 else "")
    raise ConfigError(f"ranks {ranks} resolved another configuration than rank 0 ({gathered[0][1]}): {shown}. Every "
                      "node must run the same files and settings; precision.dtype=auto decides per machine, so set "
                      "it explicitly on mixed hardware")
